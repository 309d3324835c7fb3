"""The worker's HTTP endpoints: /metrics, /customers/{id} (GET: the customer's picture; DELETE: erasure), /healthz.
A bearer token (``STREAMPROC_HTTP_TOKEN``) guards the customer endpoints."""

from __future__ import annotations

import hmac
import logging

import faust
from faust.web import Request, Response, View
from prometheus_client import generate_latest

from streamproc.metrics import Metrics
from streamproc.pipeline.lookup import locate, lookup
from streamproc.ports import FeatureStore, ModelStore
from streamproc.settings import Settings

log = logging.getLogger("streamproc.worker")


def add_views(app: faust.App, store: FeatureStore, models: ModelStore, settings: Settings, metrics: Metrics) -> None:
    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(generate_latest(metrics.registry), content_type="text/plain; version=0.0.4")

    def authorized(request: Request) -> bool:
        token = settings.http_token
        if token is None:
            return True
        expected = f"Bearer {token.get_secret_value()}"
        return hmac.compare_digest(request.headers.get("Authorization", ""), expected)

    @app.page("/customers/{customer_id}")
    class CustomerView(View):
        async def get(self, request: Request, customer_id: str) -> Response:
            if not authorized(request):
                return self.json({"error": "unauthorized"}, status=401)
            found = await lookup(store, models, settings, await locate(store, settings, customer_id))
            if found is None:
                return self.json({"error": "not found"}, status=404)
            return self.json(found)

        async def delete(self, request: Request, customer_id: str) -> Response:
            """Erase the customer (GDPR): features, state, model outputs; the erasure is remembered."""
            if not authorized(request):
                return self.json({"error": "unauthorized"}, status=401)
            where = await locate(store, settings, customer_id)
            erased = await store.forget(where)
            metrics.customers_erased.inc()
            log.info("a customer was erased through the API")  # no id at info level
            return self.json({"erased": erased})

    @app.page("/healthz")
    class HealthView(View):
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok"})
