"""Local infrastructure helpers that need no running service."""

from __future__ import annotations

import base64
import uuid

import pytest

from streamproc.tools import infra


def test_kafka_cluster_id_never_looks_like_an_option(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0xF8 as the first byte encodes to "-" in url-safe base64: the id a CI run choked on.
    dashed = uuid.UUID(bytes=bytes([0xF8]) + bytes(15))
    plain = uuid.UUID(bytes=bytes([0x10]) + bytes(15))
    draws = iter([dashed, dashed, plain])
    monkeypatch.setattr(infra.uuid, "uuid4", lambda: next(draws))

    cluster_id = infra.kafka_cluster_id()

    assert not cluster_id.startswith("-")
    assert len(cluster_id) == 22
    assert uuid.UUID(bytes=base64.urlsafe_b64decode(cluster_id + "==")) == plain
