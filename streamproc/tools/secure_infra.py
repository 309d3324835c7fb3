"""The local secure infrastructure: ``streamproc infra up --secure``.

- A throwaway CA and one node certificate (``openssl``), made at first start under ``state_dir/secure`` (git-ignored),
  never committed.
- A Kafka node whose clients must use SASL_SSL with SCRAM-SHA-512; the node talks to itself (broker to controller)
  over mutual TLS with its certificate, the one super user. It creates the SCRAM users of ``security.KAFKA_ROLES``
  through the admin API and applies ``security.kafka_grants`` with Kafka's ``StandardAuthorizer``: nothing else is
  allowed.
- A Redis server that listens on TLS only, the default user off, one ACL user per ``security.REDIS_ROLES``.

Passwords are random, made once, kept in ``credentials.json`` (mode 0600). ``env(role)`` gives the settings a
process of that role runs with; ``streamproc infra up --secure`` writes them as ``<role>.env``."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.admin import (
    ACL,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    ResourcePattern,
    ResourceType,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from streamproc.security import KAFKA_ROLES, REDIS_ROLES, KafkaGrant, kafka_grants, redis_acl_file
from streamproc.settings import Settings
from streamproc.tools.infra import InfraError, KafkaService, RedisService, ServiceStatus

SECURE_KAFKA_PORT = 19392  # SASL_SSL for clients; +1: the node's own mutual-TLS listener; +2: its controller
SECURE_REDIS_PORT = 16390  # TLS only
NODE_NAME = "streamproc-local-node"  # the certificate's CN: Kafka's super user is User:CN=<this>
CERT_DAYS = 30
SCRAM_ITERATIONS = 8192


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    os.chmod(path, 0o600)  # a file made earlier with looser rights too
    path.write_text(text)


class Pki:
    """The throwaway CA and the node's certificate (server and client use), for 127.0.0.1 and localhost."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.ca = folder / "ca.pem"
        self.cert = folder / "node.pem"
        self.key = folder / "node.key"
        self.keystore = folder / "node-keystore.pem"  # the key and certificate in one file, as Kafka's PEM keystore

    def valid(self) -> bool:
        """The node's certificate exists and holds for another day at least."""
        return self.keystore.exists() and subprocess.run(
            ["openssl", "x509", "-checkend", "86400", "-noout", "-in", str(self.cert)],
            capture_output=True).returncode == 0

    def ensure(self) -> None:
        """Make the CA and the node's certificate, again when they are about to expire (restart the services
        then: they read them at start)."""
        if self.valid():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        ext = self.dir / "node.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
                       "basicConstraints=CA:FALSE\n")
        days = str(CERT_DAYS)
        for argv in (
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", days,
             "-subj", "/CN=streamproc-local-ca"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr",
             "-subj", f"/CN={NODE_NAME}"],
            ["x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "node.pem", "-days", days, "-extfile", "node.ext"],
        ):
            done = subprocess.run(["openssl", *argv], cwd=self.dir, capture_output=True, text=True)
            if done.returncode:
                raise InfraError(f"openssl {argv[0]} failed: {done.stderr.strip()}")
        _write_private(self.keystore, self.key.read_text() + self.cert.read_text())


class Credentials:
    """One random password per Kafka user and per Redis user, made once."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, dict[str, str]]:
        if not self.path.exists():
            made = {"kafka": {r: secrets.token_urlsafe(24) for r in KAFKA_ROLES},
                    "redis": {r: secrets.token_urlsafe(24) for r in REDIS_ROLES}}
            _write_private(self.path, json.dumps(made, indent=1))
        loaded: dict[str, dict[str, str]] = json.loads(self.path.read_text())
        return loaded


class SecureKafka(KafkaService):
    name = "kafka-secure"

    def __init__(self, settings: Settings, pki: Pki) -> None:
        self.pki = pki
        super().__init__(settings)

    @property
    def port(self) -> int:
        return SECURE_KAFKA_PORT

    @property
    def internal_port(self) -> int:
        return SECURE_KAFKA_PORT + 1

    @property
    def controller_port(self) -> int:
        return SECURE_KAFKA_PORT + 2

    def properties(self) -> dict[str, str]:
        p = self.port
        return {
            **super().properties(),
            "listeners": f"SASL_SSL://127.0.0.1:{p},INTERNAL://127.0.0.1:{p + 1},CONTROLLER://127.0.0.1:{p + 2}",
            "advertised.listeners": f"SASL_SSL://127.0.0.1:{p},INTERNAL://127.0.0.1:{p + 1}",
            "listener.security.protocol.map": "SASL_SSL:SASL_SSL,INTERNAL:SSL,CONTROLLER:SSL",
            "inter.broker.listener.name": "INTERNAL",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.pki.keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.pki.ca),
            # the node's own listeners take only a client certificate signed by the CA: the node itself
            "listener.name.internal.ssl.client.auth": "required",
            "listener.name.controller.ssl.client.auth": "required",
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": f"User:CN={NODE_NAME}",
        }

    def admin_kwargs(self) -> dict[str, object]:
        return {"bootstrap_servers": f"127.0.0.1:{self.internal_port}", "security_protocol": "SSL",
                "ssl_cafile": str(self.pki.ca), "ssl_certfile": str(self.pki.cert),
                "ssl_keyfile": str(self.pki.key)}

    def _jvm_args(self) -> list[str]:  # a smaller heap: it runs beside the plain broker in the test suite
        return [arg if not arg.startswith(("-Xmx", "-Xms")) else arg[:4] + "512m" for arg in super()._jvm_args()]

    def apply_access(self, passwords: dict[str, str], grants: list[KafkaGrant]) -> None:
        """Create (or reset) each role's SCRAM user and add its ACLs; both are idempotent. ACLs are only added:
        a grant taken out of ``security.kafka_grants`` stays on a running broker until removed with kafka-acls
        (a fresh local setup has exactly the declared ones)."""
        admin = KafkaAdminClient(request_timeout_ms=15000, client_id="streamproc-infra", **self.admin_kwargs())
        try:
            admin.alter_user_scram_credentials([
                UserScramCredentialUpsertion(user, ScramMechanism.SCRAM_SHA_512, password, SCRAM_ITERATIONS)
                for user, password in passwords.items()])
            admin.create_acls([
                ACL(f"User:{g.principal}", "*", ACLOperation[g.operation], ACLPermissionType.ALLOW,
                    ResourcePattern(ResourceType[g.resource], g.name, ACLResourcePatternType[g.pattern]))
                for g in grants])
        finally:
            admin.close()


class SecureRedis(RedisService):
    name = "redis-tls"

    def __init__(self, settings: Settings, pki: Pki, passwords: dict[str, str]) -> None:
        self.pki = pki
        self.passwords = passwords
        super().__init__(settings)

    @property
    def port(self) -> int:
        return SECURE_REDIS_PORT

    def up(self, timeout: float = 15.0, extra_args: list[str] | None = None) -> ServiceStatus:
        acl = self.dir / "users.acl"
        _write_private(acl, redis_acl_file(self.passwords))
        return super().up(timeout, [
            "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.pki.cert),
            "--tls-key-file", str(self.pki.key), "--tls-ca-cert-file", str(self.pki.ca),
            "--tls-auth-clients", "no",  # clients authenticate as ACL users; TLS encrypts and proves the server
            "--aclfile", str(acl), *(extra_args or [])])


class SecureInfra:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.state_dir / "secure"
        self.pki = Pki(self.dir / "pki")
        self.credentials = Credentials(self.dir / "credentials.json")
        self.kafka = SecureKafka(settings, self.pki)
        self._redis: SecureRedis | None = None

    @property
    def redis(self) -> SecureRedis:
        if self._redis is None:  # `infra status`/`down` make no credentials: they are made by `up`
            self._redis = SecureRedis(self.settings, self.pki, {})
        return self._redis

    def up(self, timeout: float = 120.0) -> list[ServiceStatus]:
        self.pki.ensure()
        passwords = self.credentials.load()
        self.redis.passwords = passwords["redis"]
        statuses = [self.redis.up(), self.kafka.up(timeout)]
        self.kafka.apply_access(passwords["kafka"], kafka_grants(self.settings))
        self._wait_authenticates(passwords["kafka"]["admin"], timeout=30)
        for role in sorted({*KAFKA_ROLES, *REDIS_ROLES}):
            _write_private(self.dir / f"{role}.env", "".join(f"{k}={v}\n" for k, v in self.env(role).items()))
        return statuses

    def _wait_authenticates(self, password: str, timeout: float) -> None:
        """SCRAM users are metadata records: wait until the client listener knows them."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{self.kafka.port}", request_timeout_ms=5000,
                                 security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                                 sasl_plain_username="admin", sasl_plain_password=password,
                                 ssl_cafile=str(self.pki.ca)).close()
                return
            except Exception as exc:  # any failure is retried until the deadline, then raised
                if time.monotonic() > deadline:
                    raise InfraError(f"the secure broker refuses its admin user: {exc}") from exc
                time.sleep(0.5)

    def env(self, role: str) -> dict[str, str]:
        """The settings (``STREAMPROC_*``) a process of ``role`` runs with against the secure infrastructure."""
        passwords = self.credentials.load()
        kafka = {
            "STREAMPROC_KAFKA_BOOTSTRAP": f"127.0.0.1:{self.kafka.port}",
            "STREAMPROC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "STREAMPROC_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "STREAMPROC_KAFKA_SASL_USERNAME": role,
            "STREAMPROC_KAFKA_SASL_PASSWORD": passwords["kafka"][role],
            "STREAMPROC_KAFKA_SSL_CAFILE": str(self.pki.ca),
        }
        # workers score; the trainer learns in a process (and role) of its own
        alone = {"STREAMPROC_TRAINER_ENABLED": "false"} if role == "worker" else {}
        return {
            **kafka,
            **alone,
            "STREAMPROC_REDIS_URL": f"rediss://127.0.0.1:{self.redis.port}/0",
            "STREAMPROC_REDIS_USERNAME": role,
            "STREAMPROC_REDIS_PASSWORD": passwords["redis"][role],
            "STREAMPROC_REDIS_SSL_CA_CERTS": str(self.pki.ca),
        }

    def down(self) -> list[str]:
        return [svc.name for svc in (self.kafka, self.redis) if svc.down()]
