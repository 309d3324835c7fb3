"""Security settings reach the clients (config level) and never print in clear."""

from __future__ import annotations

import faust
from pydantic import SecretStr

from streamproc.settings import Settings
from streamproc.topics import faust_credentials, kafka_security_kwargs


def test_plaintext_adds_nothing():
    s = Settings()
    assert kafka_security_kwargs(s) == {} and faust_credentials(s) is None and s.redis_kwargs() == {}


def test_sasl_ssl_is_passed_to_kafka_python_and_faust(tmp_path):
    s = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                 kafka_sasl_username="svc", kafka_sasl_password=SecretStr("kafka-secret"))
    assert kafka_security_kwargs(s) == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc", "sasl_plain_password": "kafka-secret",
    }
    creds = faust_credentials(s)
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.username == "svc" and creds.password == "kafka-secret"
    assert creds.mechanism.value == "SCRAM-SHA-512" and creds.ssl_context is not None


def test_ssl_files_are_passed_through(tmp_path):
    s = Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "ca.pem")
    assert kafka_security_kwargs(s) == {"security_protocol": "SSL", "ssl_cafile": str(tmp_path / "ca.pem")}


def test_the_worker_app_gets_the_credentials():
    from streamproc.runtime.app import Worker

    s = Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="svc",
                 kafka_sasl_password=SecretStr("pw"))
    worker = Worker(s)
    assert isinstance(worker.app.conf.broker_credentials, faust.SASLCredentials)


def test_redis_acl_user_and_tls_options():
    s = Settings(redis_url="rediss://redis.internal:6380/0", redis_username="alice",
                 redis_password=SecretStr("redis-secret"), redis_ssl_ca_certs="/etc/ssl/ca.pem")
    assert s.redis_kwargs() == {"username": "alice", "password": "redis-secret", "ssl_ca_certs": "/etc/ssl/ca.pem"}


def test_secrets_are_masked_when_printed():
    s = Settings(kafka_sasl_password=SecretStr("kafka-secret"), redis_password=SecretStr("redis-secret"),
                 http_token=SecretStr("token-secret"), redis_url="redis://bob:url-secret@host:6379/0")
    shown = repr(s.masked()) + repr(s) + str(s)
    for secret in ("kafka-secret", "redis-secret", "token-secret", "url-secret"):
        assert secret not in shown


def test_pseudonyms_are_keyed_stable_and_not_the_id():
    from streamproc.settings import pseudonym

    a = Settings(pseudonymize_key=SecretStr("k1"))
    assert a.customer_key("c1") == a.customer_key("c1") == pseudonym("k1", "c1")
    assert a.customer_key("c1") != Settings(pseudonymize_key=SecretStr("k2")).customer_key("c1")
    assert "c1" not in a.customer_key("c1") and Settings().customer_key("c1") == "c1"
