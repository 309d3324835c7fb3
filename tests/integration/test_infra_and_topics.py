import subprocess
import sys

import pytest
from kafka.admin import NewTopic

from streamproc.tools.infra import Infra
from streamproc.topics import admin_client, apply_topics, load_specs

pytestmark = pytest.mark.integration


def test_services_are_up_and_a_second_up_reuses_them(infra):
    first = {s.name: s for s in Infra(infra).status()}
    assert first["kafka"].running and first["redis"].running
    again = {s.name: s for s in Infra(infra).up()}
    assert again["kafka"].pid == first["kafka"].pid and again["redis"].pid == first["redis"].pid


def test_customer_hashes_are_stored_as_compact_listpacks(infra, settings):
    import redis

    from streamproc.tools.infra import HASH_MAX_LISTPACK_VALUE

    if not {s.name: s for s in Infra(infra).status()}["redis"].owned:
        pytest.skip("a Redis streamproc did not start: its configuration is the operator's")
    r = redis.Redis.from_url(settings.redis_url)
    try:
        assert r.config_get("hash-max-listpack-value")["hash-max-listpack-value"] == str(HASH_MAX_LISTPACK_VALUE)
        r.hset("cust:{c1}", mapping={"f": "x" * 3000, "_s": "y" * 2000, "_v": 1})
        assert r.object("encoding", "cust:{c1}") == b"listpack"
    finally:
        r.close()


def test_apply_creates_every_declared_topic_then_is_idempotent(settings):
    first = apply_topics(settings)
    assert sorted(first.created) == sorted(settings.topic(n) for n in load_specs())
    second = apply_topics(settings)
    assert second.created == [] and second.ok
    assert sorted(second.unchanged) == sorted(first.created)


def test_a_run_deletes_its_own_topics_and_no_one_else_s(settings):
    from streamproc.topics import delete_run_topics

    other = settings.model_copy(update={"topic_prefix": f"other-{settings.topic_prefix}"})
    assert apply_topics(settings).ok and apply_topics(other).ok
    admin = admin_client(settings)
    try:
        admin.create_topics([NewTopic(f"{settings.app_id}-__assignor-__leader", 1, 1)])  # as Faust names it
        deleted = delete_run_topics(settings)
        left = set(admin.list_topics())
    finally:
        admin.close()
    assert sorted(deleted) == sorted([*(settings.topic(n) for n in load_specs()),
                                      f"{settings.app_id}-__assignor-__leader"])
    assert not left & set(deleted)
    assert {other.topic(n) for n in load_specs()} <= left
    delete_run_topics(other)
    with pytest.raises(ValueError):
        delete_run_topics(settings.model_copy(update={"topic_prefix": ""}))


def test_apply_reports_a_topic_that_differs_from_its_declaration(settings):
    admin = admin_client(settings)
    try:
        admin.create_topics([NewTopic(settings.topic("clicks"), 2, 1, topic_configs={"cleanup.policy": "compact"})])
    finally:
        admin.close()
    report = apply_topics(settings)
    assert not report.ok
    (problem,) = report.mismatched
    assert "partitions 2 != declared 4" in problem and "cleanup.policy" in problem
    from tests.conftest import worker_env

    out = subprocess.run([sys.executable, "-m", "streamproc.cli", "topics", "apply"], env=worker_env(settings),
                         capture_output=True, text=True)
    assert out.returncode == 2 and "MISMATCH" in out.stderr
