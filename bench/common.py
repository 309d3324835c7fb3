"""What the benchmarks share: an isolated run on the local infrastructure."""

from __future__ import annotations

import os
import platform
import sys
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamproc.settings import Settings  # noqa: E402
from streamproc.tools.infra import Infra  # noqa: E402
from streamproc.topics import apply_topics  # noqa: E402


def isolated_run(name: str, redis_db: int, web_port: int) -> tuple[Settings, dict[str, str], str]:
    """Start the local Kafka and Redis if needed, create fresh topics under an own prefix and empty a Redis
    db. Returns the settings, the environment for a `streamproc worker` using them, and the run's tag."""
    base = Settings()
    Infra(base).up()
    tag = uuid.uuid4().hex[:6]
    settings = base.model_copy(update={
        "topic_prefix": f"{name}{tag}.", "app_id": f"{name}-{tag}",
        "redis_url": base.redis_url.rsplit("/", 1)[0] + f"/{redis_db}", "web_port": web_port,
    })
    client = redis.Redis.from_url(settings.redis_url)
    client.flushdb()
    client.close()
    apply_topics(settings)
    env = {**os.environ, "STREAMPROC_TOPIC_PREFIX": settings.topic_prefix, "STREAMPROC_APP_ID": settings.app_id,
           "STREAMPROC_REDIS_URL": settings.redis_url, "STREAMPROC_WEB_PORT": str(web_port),
           "STREAMPROC_LOG_LEVEL": "WARNING",
           # River sums distances over key sets, whose order follows Python's string hashing: pin it so that
           # a run's models (and so segments and scores) are reproducible
           "PYTHONHASHSEED": "0"}
    return settings, env, tag


def machine() -> str:
    """The machine line every benchmark result carries."""
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
