"""``streamproc ui``: the retention team's pages (At risk, Customer, Segments, Uplift, Health), and
``streamproc report``: the same figures in one self-contained HTML file.

A process of its own, read only: Redis as a reader, the alerts topic read from its start without a consumer group
(folded into an ``AlertBoard``), the workers' /metrics sampled every few seconds. Guarded by the lookup API's bearer
token (``STREAMPROC_HTTP_TOKEN``): a browser signs in once on /ui/login and gets a session cookie derived from
the token, never the token itself. No access log: a customer page's URL carries the id looked up."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from streamproc.access import refused
from streamproc.adapters.checkpoint_signing import signing_key
from streamproc.adapters.model_store import RedisModelStore
from streamproc.adapters.redis_store import RedisFeatureStore
from streamproc.contracts.outputs import AlertRecord, validate
from streamproc.domain.alert_board import AlertBoard
from streamproc.settings import Settings
from streamproc.tools.tail import read_topic
from streamproc.topics import ALERTS_TOPIC, aiokafka_security_kwargs, topic_partitions
from streamproc.ui import render
from streamproc.ui.data import Health, UiData

log = logging.getLogger("streamproc.ui")

SESSION_COOKIE = "streamproc_ui"
HEALTH_EVERY_S = 5.0
AT_RISK_ROWS = 500  # the At-risk page lists the most urgent 500 (the totals count them all)
REPORT_ROWS = 100
SECURITY_HEADERS = {
    # nothing but this page's own inline styles: no script, no request to anywhere else
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
                               "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer", "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
}


SESSION_MAX_AGE_S = 12 * 3600
# the sessions of this process: a restart signs everyone out
_SESSION_KEY = secrets.token_bytes(32)


def session_value(token: str) -> str:
    """The cookie a signed-in browser carries: derived from the token and this process's key, so the token itself
    is never stored there, and a cookie dies with the process."""
    return hmac.new(_SESSION_KEY, token.encode(), hashlib.sha256).hexdigest()


def same(given: str, expected: str) -> bool:
    """A constant-time comparison that takes any text (``compare_digest`` refuses non-ASCII ``str``)."""
    return hmac.compare_digest(given.encode(), expected.encode())


def open_stores(settings: Settings) -> tuple[RedisFeatureStore, RedisModelStore]:
    store = RedisFeatureStore.from_url(settings.redis_url, **settings.redis_kwargs())
    return store, RedisModelStore(store.redis, signing_key(settings))


async def follow_alerts(settings: Settings, board: AlertBoard, stopping: asyncio.Event) -> None:
    """Fold the alerts topic into ``board`` from its first record on, for as long as the UI runs."""
    topic = settings.topic(ALERTS_TOPIC)
    while not stopping.is_set():
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    client_id=f"{settings.app_id}-ui", **aiokafka_security_kwargs(settings))
        try:
            # a consumer without a subscription has no topic metadata: the admin API says how many partitions
            partitions = await asyncio.to_thread(topic_partitions, settings, ALERTS_TOPIC)
            if not partitions:  # the topic is not there yet (`streamproc topics apply`)
                await asyncio.sleep(2.0)
                continue
            await consumer.start()
            consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
            await consumer.seek_to_beginning()
            while not stopping.is_set():
                for records in (await consumer.getmany(timeout_ms=500, max_records=5000)).values():
                    for record in records:
                        apply_record(board, record.value, record.offset)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the broker gone and the like: read the topic again from its start
            refusal = refused(exc, settings)
            if refusal is not None:  # a wrong password or no ACL: say so and stop, as the other commands do
                log.critical("the UI stops: %s", refusal)
                stopping.set()
                return
            log.warning("alerts reader failed (%s: %s); starting over", type(exc).__name__, exc)
            board.reset()
            await asyncio.sleep(2.0)
        finally:
            await consumer.stop()


def apply_record(board: AlertBoard, value: bytes | None, offset: int) -> None:
    """One alerts-topic record (its bytes) into ``board``: see ``apply_decoded``."""
    try:
        decoded = orjson.loads(value or b"")
    except orjson.JSONDecodeError as exc:
        log.warning("skipping an alert record at offset %s that breaks its contract: %s", offset, exc)
        return
    apply_decoded(board, decoded, offset)


def apply_decoded(board: AlertBoard, decoded: Any, offset: int) -> None:
    """One decoded alerts-topic record into ``board``, checked against its contract first: a record that breaks
    it is skipped (and logged), never one that breaks the page for everyone."""
    try:
        validate(AlertRecord, decoded)
    except ValidationError as exc:
        log.warning("skipping an alert record at offset %s that breaks its contract: %s", offset,
                    str(exc).splitlines()[0])
        return
    board.apply(decoded)


Handler = Callable[[web.Request], Awaitable[web.Response]]


class Pages:
    """The handlers: each page signed in, rendered from ``data``."""

    def __init__(self, settings: Settings, data: UiData) -> None:
        self.token = settings.http_token.get_secret_value() if settings.http_token is not None else None
        self.data = data
        self.board = data.board
        # alerts carry the stored id: a pseudonym when ids are pseudonymised, which the search cannot take back
        self.links = settings.pseudonymize_key is None

    def signed_in(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        header = request.headers.get("Authorization", "")
        cookie = request.cookies.get(SESSION_COOKIE, "")
        return same(header, f"Bearer {self.token}") or same(cookie, session_value(self.token))

    def guarded(self, handler: Handler) -> Handler:
        async def run(request: web.Request) -> web.Response:
            if not self.signed_in(request):
                raise web.HTTPSeeOther("/ui/login")
            return await handler(request)
        return run

    @staticmethod
    def page(title: str, body: str, active: str | None, status: int = 200) -> web.Response:
        return web.Response(text=render.document(title, body, active), content_type="text/html", status=status,
                            headers=SECURITY_HEADERS)

    async def at_risk(self, request: web.Request) -> web.Response:
        chosen = {k: (request.query.get(k) or None) for k in ("tier", "risk", "segment")}
        rows = self.board.at_risk(**chosen, limit=AT_RISK_ROWS)
        segments = sorted({str(a.get("segment")) for a in self.board.open.values()})
        return self.page("At risk", render.at_risk_body(rows, self.board.totals(), segments, chosen,
                                                        self.board.watermark, links=self.links), "at-risk")

    async def customer(self, request: web.Request) -> web.Response:
        query = (request.query.get("id") or "").strip()
        found = await self.data.customer(query) if query else None
        return self.page("Customer", render.customer_body(query, found), "customer",
                         404 if query and not found else 200)

    async def segments(self, request: web.Request) -> web.Response:
        return self.page("Segments", render.segments_body(await self.data.segments()), "segments")

    async def uplift(self, request: web.Request) -> web.Response:
        return self.page("Uplift", render.uplift_body(await self.data.uplift()), "uplift")

    async def health(self, request: web.Request) -> web.Response:
        h = self.data.health
        return self.page("Health", render.health_body(h.numbers(), h.rates(), [s.lag for s in h.samples]),
                         "health")

    async def login_form(self, request: web.Request) -> web.Response:
        return self.page("Sign in", render.login_body(error=False), None)

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        if self.token is None or same(str(form.get("token", "")), self.token):
            response = web.HTTPSeeOther("/ui/")
            if self.token is not None:
                response.set_cookie(SESSION_COOKIE, session_value(self.token), httponly=True, samesite="Strict",
                                    path="/ui", max_age=SESSION_MAX_AGE_S, secure=request.secure)
            raise response
        await asyncio.sleep(1.0)  # a wrong token costs a second: guessing stays slow
        return self.page("Sign in", render.login_body(error=True), None, status=401)


def build_app(settings: Settings, data: UiData) -> web.Application:
    pages = Pages(settings, data)
    signed = pages.guarded
    app = web.Application()
    app.add_routes([
        web.get("/ui/", signed(pages.at_risk)), web.get("/ui", signed(pages.at_risk)),
        web.get("/ui/customer", signed(pages.customer)), web.get("/ui/segments", signed(pages.segments)),
        web.get("/ui/uplift", signed(pages.uplift)), web.get("/ui/health", signed(pages.health)),
        web.get("/ui/login", pages.login_form), web.post("/ui/login", pages.login),
        web.get("/", _to_pages),
    ])
    return app


async def _to_pages(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/ui/")


def run_ui(settings: Settings, port: int, metrics_urls: list[str]) -> None:
    """Serve the pages on ``settings.web_host``:``port`` until SIGTERM/SIGINT."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s")

    async def main() -> None:
        store, models = open_stores(settings)
        board, stopping = AlertBoard(), asyncio.Event()
        health = Health(metrics_urls)
        data = UiData(settings, store, models, board, health)
        runner = web.AppRunner(build_app(settings, data), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, settings.web_host, port).start()
        log.info("retention pages on http://%s:%s/ui/", settings.web_host, port)
        tasks = [asyncio.create_task(follow_alerts(settings, board, stopping)),
                 asyncio.create_task(_sample_health(health, stopping))]
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        for task in tasks:
            task.cancel()
        await runner.cleanup()
        await store.close()

    asyncio.run(main())


async def _sample_health(health: Health, stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        await asyncio.to_thread(health.sample)
        await asyncio.sleep(HEALTH_EVERY_S)


def write_report(settings: Settings, out: Path, metrics_urls: list[str]) -> dict[str, Any]:
    """``streamproc report``: every page's figures as of the current watermark, in one HTML file that loads
    nothing from anywhere. Returns what it counted."""
    board = AlertBoard()
    for offset, record in enumerate(read_topic(settings, ALERTS_TOPIC, 10_000_000, 2.0)):
        apply_decoded(board, record, offset)  # read_topic has decoded it
    health = Health(metrics_urls)
    health.sample()

    async def gather() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        store, models = open_stores(settings)
        try:
            data = UiData(settings, store, models, board, health)
            return await data.segments(), await data.uplift()
        finally:
            await store.close()

    segments, uplift = asyncio.run(gather())
    out.write_text(render.report_document(board, segments, uplift, health.numbers(), REPORT_ROWS))
    return {"open_alerts": len(board.open), "segments": len(segments), "uplift_rows": len(uplift)}
