"""Security on the real components (``streamproc infra up --secure``): a Kafka node that takes only SASL_SSL with
SCRAM-SHA-512 and authorizes with ACLs, and a Redis on TLS with one ACL user per role. Every client path works with
its own role's credentials; a wrong password, a missing CA certificate and a missing ACL are refused in one clear
line, not a hang; each Redis role is refused what it may not do; and no secret shows in any log, output, metric or
dead letter of the run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from streamproc.adapters.redis_clients import sync_redis
from streamproc.settings import Settings
from streamproc.tools.demo import scrape
from streamproc.tools.secure_infra import SecureInfra
from tests.conftest import ROOT, WorkerProcess, free_port, produce
from tests.integration.test_alert_forwarder import SECRET as WEBHOOK_SECRET
from tests.integration.test_alert_forwarder import Receiver, alerts, wait_for

pytestmark = pytest.mark.integration

SIGNING_KEY = "secure-run-signing-key-0123456789"


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureInfra]:
    """A fresh CA, fresh passwords and a fresh broker and Redis for this module, stopped after it."""
    infra = SecureInfra(Settings(state_dir=tmp_path_factory.mktemp("secure-state")))
    infra.up()
    yield infra
    infra.down()


def role_env(secure: SecureInfra, role: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMPROC_")}
    return {**env, "STREAMPROC_STATE_DIR": str(secure.dir / "run"), **secure.env(role), **extra}


def role_settings(secure: SecureInfra, role: str) -> Settings:
    return Settings.model_validate({k.removeprefix("STREAMPROC_").lower(): v for k, v in secure.env(role).items()})


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamproc.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def role_process(secure: SecureInfra, role: str, tmp_path: Path, command: str) -> WorkerProcess:
    settings = role_settings(secure, role).model_copy(update={"web_port": free_port(),
                                                              "state_dir": secure.dir / "run"})
    proc = WorkerProcess(settings, tmp_path / f"{command}.log", command)
    proc.extra_env.update({**secure.env(role), "STREAMPROC_MODEL_SIGNING_KEY": SIGNING_KEY})
    return proc


def secrets_of(secure: SecureInfra) -> list[str]:
    stored = secure.credentials.load()
    return [*stored["kafka"].values(), *stored["redis"].values(), SIGNING_KEY, WEBHOOK_SECRET]


def test_every_client_path_works_with_its_own_role_and_no_secret_leaks(secure, tmp_path):
    admin, outputs = role_env(secure, "admin"), []
    outputs.append(ok(cli(admin, "topics", "apply")))
    simulated = ok(cli(admin, "simulate", "--customers", "25", "--days", "20", "--seed", "3"))
    outputs.append(simulated)
    events = int(re.search(r"sent (\d+) events", simulated).group(1))
    replayed = tmp_path / "events.jsonl"
    replayed.write_text("".join(json.dumps({
        "event_type": "click", "event_id": f"r-{i}", "customer_id": "replayed-1", "ts": 1_767_300_000_000 + i,
        "action": "product_view", "product_id": "boo-001", "category": "books", "session_id": "rs-1"}) + "\n"
        for i in range(5)))
    outputs.append(ok(cli(admin, "replay", str(replayed))))
    produce(role_settings(secure, "admin"), [("clicks", b"bad-1", b"{not json")])  # dead-lettered, bytes kept

    worker = role_process(secure, "worker", tmp_path, "worker").start()
    trainer = role_process(secure, "trainer", tmp_path, "trainer").start()
    try:
        # the worker's Faust consumer and producer: every event read, the training snapshots and a dead letter out
        metrics = worker.wait_processed(events + 5 + 1, timeout=120)
        wait_for(lambda: scrape(worker.settings.web_port).get(
            'streamproc_records_produced_total{topic="streamproc-training"}', 0) > 0, 60, "training snapshots")
        # the trainer's consumer: it learned them and wrote a signed checkpoint with the trainer's Redis user
        reader = sync_redis(secure.env("reader")["STREAMPROC_REDIS_URL"], **role_settings(secure, "reader")
                            .redis_kwargs())
        wait_for(lambda: reader.get("sp:{model}:current") is not None, 90, "the trainer's first checkpoint")
        metrics = {**metrics, **scrape(worker.settings.web_port), **scrape(trainer.settings.web_port)}
        # the worker's erasure endpoint, with the worker's Redis user
        erase = urllib.request.Request(f"http://127.0.0.1:{worker.settings.web_port}/customers/c0000003",
                                       method="DELETE")
        with urllib.request.urlopen(erase, timeout=10) as answer:
            assert json.loads(answer.read()) == {"erased": True}
    finally:
        worker.stop(signal.SIGTERM)
        trainer.stop(signal.SIGTERM)
    assert int(reader.get("sp:{model}:current")) >= 1
    reader.close()

    # lookups and the retention report read only (the report reads the alerts topic as the reader's Kafka user)
    shown = json.loads(ok(cli(role_env(secure, "reader"), "customer", "show", "replayed-1", "--json")))
    outputs.append(ok(cli(role_env(secure, "reader"), "report", "--out", str(tmp_path / "report.html"))))
    assert "Customers at risk" in (tmp_path / "report.html").read_text()
    assert shown["stored_features"]["clicks"] == 5
    outputs.append(ok(cli(admin, "customer", "forget", "replayed-1")))
    assert cli(role_env(secure, "reader"), "customer", "show", "replayed-1", "--json").returncode != 0

    # tail: the dead letter, with its reason
    dead = ok(cli(admin, "tail", "streamproc-dlq", "--json", "--max", "5", "--timeout", "3"))
    assert "bad-1" in dead or "not json" in dead, dead
    outputs.append(dead)

    # forward: alerts to a webhook, signed, with the admin's Kafka user
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    produce(role_settings(secure, "admin"), alerts("ok", 3))
    with open(tmp_path / "forward.log", "wb") as log:
        forward = subprocess.Popen(
            [sys.executable, "-m", "streamproc.cli", "forward", "alerts", "--url", receiver.url],
            env=role_env(secure, "admin", STREAMPROC_WEBHOOK_SECRET=WEBHOOK_SECRET), cwd=ROOT, stdout=log,
            stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: len({r["alert_id"] for r in receiver.requests if r["status"] == 200}) >= 3, 60,
                     "three alerts forwarded")
        finally:
            forward.send_signal(signal.SIGTERM)
            forward.wait(30)
            receiver.shutdown()
    assert all(r["signed"] for r in receiver.requests)

    # no password, key or token in any log, output, metric, setting print-out or dead letter of the run
    for role in ("worker", "trainer", "reader", "admin"):
        outputs.append(ok(cli(role_env(secure, role, STREAMPROC_MODEL_SIGNING_KEY=SIGNING_KEY,
                                       STREAMPROC_WEBHOOK_SECRET=WEBHOOK_SECRET), "settings")))
    logs = [p.read_text(errors="replace") for p in tmp_path.glob("*.log")]
    seen = "\n".join([*outputs, *logs, json.dumps(metrics), (tmp_path / "report.html").read_text()])
    assert "SASL_SSL" in seen and "rediss://" in seen  # the print-outs are of the secure run
    leaked = [i for i, secret in enumerate(secrets_of(secure)) if secret in seen]
    assert not leaked, f"secrets #{leaked} (of {len(secrets_of(secure))}) appear in the run's logs or outputs"


def refused_quickly(done: subprocess.CompletedProcess[str], *reason: str) -> str:
    """Exit 77 with one ``error:`` line naming the reason, no traceback."""
    assert done.returncode == 77, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: "), done.stderr
    assert any(r in done.stderr for r in reason), done.stderr
    return done.stderr


def test_kafka_refuses_a_wrong_password_a_missing_ca_and_a_missing_acl_in_one_line(secure):
    admin = role_env(secure, "admin")
    ok(cli(admin, "topics", "apply"))
    started = time.monotonic()
    refused_quickly(cli(role_env(secure, "admin", STREAMPROC_KAFKA_SASL_PASSWORD="not-the-password"),
                        "topics", "apply", timeout=90), "SaslAuthenticationFailed")
    no_ca = {k: v for k, v in admin.items() if k != "STREAMPROC_KAFKA_SSL_CAFILE"}
    refused_quickly(cli(no_ca, "topics", "apply", timeout=90), "CERTIFICATE_VERIFY_FAILED")
    # the trainer's user may read the training topic, not write the input topics
    refused_quickly(cli(role_env(secure, "trainer"), "simulate", "--customers", "2", "--days", "2", timeout=90),
                    "TopicAuthorizationFailed")
    # a worker with a wrong password stops with the reason instead of waiting for topics for ever
    refused_quickly(cli(role_env(secure, "worker", STREAMPROC_KAFKA_SASL_PASSWORD="nope"), "worker", timeout=90),
                    "SaslAuthenticationFailed")
    assert time.monotonic() - started < 240


def redis_as(secure: SecureInfra, role: str, **override: Any) -> redis.Redis:
    kwargs = {**role_settings(secure, role).redis_kwargs(), **override}
    return sync_redis(f"rediss://127.0.0.1:{secure.redis.port}/0", **kwargs)


def test_each_redis_role_does_its_work_over_tls_and_is_refused_the_rest(secure):
    worker, trainer, reader, admin = (redis_as(secure, r) for r in ("worker", "trainer", "reader", "admin"))
    try:
        worker.hset("cust:{p0}:probe", "f", "1")  # a customer row
        trainer.set("sp:{model}:probe", "1")
        assert worker.get("sp:{model}:probe") == b"1"  # a worker loads checkpoints ...
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker.set("sp:{model}:current", 99)  # ... and never writes one
        with pytest.raises(redis.exceptions.NoPermissionError):
            trainer.hgetall("cust:{p0}:probe")  # the trainer sees no customer
        assert reader.hgetall("cust:{p0}:probe") == {b"f": b"1"}
        with pytest.raises(redis.exceptions.NoPermissionError):
            reader.hset("cust:{p0}:probe", "f", "2")
        assert admin.delete("cust:{p0}:probe", "sp:{model}:probe") == 2  # erasure
        with pytest.raises(redis.exceptions.NoPermissionError):
            admin.flushall()
        with pytest.raises(redis.exceptions.NoPermissionError):
            admin.config_set("appendonly", "no")
    finally:
        for client in (worker, trainer, reader, admin):
            client.close()
    # no anonymous access, no plaintext, no untrusted server
    with pytest.raises(redis.exceptions.AuthenticationError):
        sync_redis(f"rediss://127.0.0.1:{secure.redis.port}/0",
                   ssl_ca_certs=str(secure.pki.ca)).ping()
    with pytest.raises(redis.exceptions.ConnectionError):
        sync_redis(f"redis://127.0.0.1:{secure.redis.port}/0", socket_timeout=3).ping()
    with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
        redis_as(secure, "reader", ssl_ca_certs=None).ping()
    # the CLI says so in one line
    refused_quickly(cli(role_env(secure, "reader"), "customer", "forget", "someone"), "Redis refused user reader")
    refused_quickly(cli(role_env(secure, "reader", STREAMPROC_REDIS_PASSWORD="wrong"), "customer", "show", "x"),
                    "Redis refused the credentials")
