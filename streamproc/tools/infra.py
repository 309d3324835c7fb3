"""Local infrastructure on loopback: a real Kafka 4.x broker (KRaft) and a Redis server; on request a Redis
Cluster and a replicated Kafka cluster. ``up`` is idempotent: a service already answering on its port is reused
(and not owned, so ``down`` leaves it alone). Services started here write a pid file under ``state_dir``;
``down`` stops only those."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaAdminClient

from streamproc.settings import PROJECT_ROOT, Settings
from streamproc.topics import min_insync

KAFKA_POM = PROJECT_ROOT / "infra" / "kafka" / "pom.xml"
LOG4J2_CONFIG = PROJECT_ROOT / "infra" / "kafka" / "log4j2.yaml"

# bytes up to which a hash value keeps the hash a listpack (Redis default: 64)
HASH_MAX_LISTPACK_VALUE = 8192

CLUSTER_NODE_TIMEOUT_MS = 3000  # short: a dead master's replica is promoted within seconds (the failover test)


class InfraError(RuntimeError):
    pass


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0); check its state
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class ServiceStatus:
    name: str
    port: int
    running: bool
    owned: bool
    pid: int | None

    def line(self) -> str:
        state = "up" if self.running else "down"
        owner = f"pid {self.pid}, started by streamproc" if self.owned else "not started by streamproc"
        return f"{self.name:<6} {state:<5} 127.0.0.1:{self.port}  ({owner if self.running else '-'})"


class _Service:
    name = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.state_dir / self.name
        self.pid_file = self.dir / "pid"

    @property
    def port(self) -> int:
        raise NotImplementedError

    def owned_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def status(self) -> ServiceStatus:
        pid = self.owned_pid()
        return ServiceStatus(self.name, self.port, self.ready(), pid is not None, pid)

    def ready(self) -> bool:
        return port_open(self.port)

    def _spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # survives the CLI that started it
                env=env,
                cwd=self.dir,
            )
        self.pid_file.write_text(str(proc.pid))
        return proc.pid

    def wait_ready(self, timeout: float, log: Path) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            pid = self.owned_pid()
            if pid is None:
                break
            time.sleep(0.2)
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise InfraError(f"{self.name} did not become ready on port {self.port}:\n{tail}")

    def down(self, timeout: float = 20.0) -> bool:
        pid = self.owned_pid()
        if pid is None:
            return False
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.1)
        if _pid_alive(pid):
            os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True


class RedisService(_Service):
    name = "redis"

    @property
    def port(self) -> int:
        return self.settings.redis_port

    def binary(self) -> str:
        path = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(path).exists():
            raise InfraError("redis-server not found: run `make deps` (apt-get install -y redis-server)")
        return path

    def up(self, timeout: float = 15.0, extra_args: list[str] | None = None) -> ServiceStatus:
        if self.ready():
            return self.status()
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.dir / "redis.log"
        argv = [
            self.binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            # a customer's hash (features, state, model outputs) stays one compact listpack: with the default
            # 64-byte limit its multi-KB values turn it into a hash table, ~15 % more memory per customer
            "--hash-max-listpack-value", str(HASH_MAX_LISTPACK_VALUE),
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            *(extra_args or []),
        ]
        self._spawn(argv, log)
        self.wait_ready(timeout, log)
        return self.status()


class RedisClusterNode(RedisService):
    """One node of the local Redis Cluster: the same binary with ``--cluster-enabled yes``."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.name = f"redis-cluster/{port}"
        self._port = port
        super().__init__(settings)

    @property
    def port(self) -> int:
        return self._port

    def up(self, timeout: float = 15.0, extra_args: list[str] | None = None) -> ServiceStatus:
        return super().up(timeout, ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                    "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS), *(extra_args or [])])


class RedisCluster:
    """A local Redis Cluster of 3 masters, each with 1 replica, on loopback: ``streamproc infra up --redis-cluster``.
    Created once with ``redis-cli --cluster create``; the nodes keep their cluster config (``nodes.conf``) in their
    own directories, so a later ``up`` brings the same cluster back."""

    NODES = 6

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.nodes = [RedisClusterNode(settings, settings.redis_cluster_port + i) for i in range(self.NODES)]

    @property
    def url(self) -> str:
        # every node a seed: a client starts while any one of them is down
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes) + "/0"

    def up(self, timeout: float = 60.0) -> list[ServiceStatus]:
        statuses = [node.up() for node in self.nodes]
        if not self.healthy():
            cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
            if self.info(self.nodes[0].port).get("cluster_known_nodes", "1") == "1":  # never joined: create it
                made = subprocess.run(
                    [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                     "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, text=True, timeout=60)
                if made.returncode != 0:
                    raise InfraError(f"redis-cli --cluster create failed:\n{made.stdout[-2000:]}{made.stderr}")
            deadline = time.monotonic() + timeout
            while not self.healthy():
                if time.monotonic() > deadline:
                    raise InfraError(f"the Redis Cluster on ports {self.nodes[0].port}+ did not become healthy")
                time.sleep(0.5)
        return statuses

    def healthy(self) -> bool:
        """Every node answers and says the cluster is ok, with all 16384 slots served."""
        for node in self.nodes:
            info = self.info(node.port)
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
        return True

    @staticmethod
    def info(port: int) -> dict[str, str]:
        """A node's ``CLUSTER INFO`` (empty when it does not answer)."""
        if not port_open(port):
            return {}
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        out = subprocess.run([cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True, timeout=10)
        return dict(line.strip().split(":", 1) for line in out.stdout.splitlines() if ":" in line)

    def down(self) -> bool:
        return any([node.down() for node in self.nodes])

    def status(self) -> list[ServiceStatus]:
        return [node.status() for node in self.nodes]


class KafkaService(_Service):
    name = "kafka"
    node_id = 1
    replication = 1  # of the broker's internal topics (offsets, transactions)

    @property
    def port(self) -> int:
        return self.settings.kafka_port

    @property
    def controller_port(self) -> int:
        return self.settings.kafka_controller_port

    def voters(self) -> str:
        return f"{self.node_id}@127.0.0.1:{self.controller_port}"

    def cluster_id(self) -> str:
        return kafka_cluster_id()

    @property
    def libs(self) -> Path:
        return self.settings.cache_dir / "kafka-libs"

    def fetch_jars(self) -> None:
        """Download the broker's jars from Maven Central (once) into the git-ignored cache."""
        if self.libs.exists() and any(self.libs.glob("kafka_2.13-*.jar")):
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise InfraError("Maven (mvn) is needed to fetch the Kafka jars")
        self.libs.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [mvn, "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies",
             f"-DoutputDirectory={self.libs}"],
            check=True,
        )

    def _java(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise InfraError("java is needed to run the Kafka broker")
        return java

    def _classpath(self) -> str:
        return f"{self.libs}/*"

    def properties(self) -> dict[str, str]:
        data = self.dir / "data"
        return {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters(),
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": str(self.replication),
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": str(self.replication),
            "transaction.state.log.min.isr": str(min_insync(self.replication)),
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": str(self.replication),
            "share.coordinator.state.topic.min.isr": str(min_insync(self.replication)),
            "default.replication.factor": str(self.replication),
            "min.insync.replicas": str(min_insync(self.replication)),
            "group.initial.rebalance.delay.ms": "0",
            "log.segment.bytes": str(64 * 1024 * 1024),
            "log.retention.check.interval.ms": "60000",
        }

    def write_config(self) -> Path:
        path = self.dir / "server.properties"
        self.dir.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{k}={v}\n" for k, v in self.properties().items()))
        return path

    def _jvm_args(self) -> list[str]:
        heap = self.settings.kafka_heap
        return [
            f"-Xmx{heap}", f"-Xms{min_heap(heap)}",
            "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            f"-Dkafka.logs.dir={self.dir / 'logs'}",
        ]

    def format_storage(self, config: Path) -> None:
        if (self.dir / "data" / "meta.properties").exists():
            return
        cluster_id = self.cluster_id()
        subprocess.run(
            [self._java(), *self._jvm_args(), "-cp", self._classpath(), "kafka.tools.StorageTool",
             "format", f"--cluster-id={cluster_id}", "-c", str(config), "--ignore-formatted"],
            check=True, stdout=subprocess.DEVNULL,
        )

    def admin_kwargs(self) -> dict[str, object]:
        """How the infra's own admin client reaches the node."""
        return {"bootstrap_servers": f"127.0.0.1:{self.port}"}

    def ready(self) -> bool:
        if not port_open(self.port):
            return False
        try:
            admin = KafkaAdminClient(request_timeout_ms=3000, client_id="streamproc-infra", **self.admin_kwargs())
            try:
                admin.list_topics()
            finally:
                admin.close()
            return True
        except Exception:
            return False

    def up(self, timeout: float = 90.0) -> ServiceStatus:
        if self.ready():
            return self.status()
        self.start()
        self.wait_ready(timeout, self.dir / "kafka.out")
        return self.status()

    def start(self) -> None:
        """Start the node without waiting for it (the nodes of a cluster only become ready together)."""
        if self.owned_pid() is not None:
            return
        self.fetch_jars()
        config = self.write_config()
        self.format_storage(config)
        self._spawn([self._java(), *self._jvm_args(), "-cp", self._classpath(), "kafka.Kafka", str(config)],
                    self.dir / "kafka.out")


class KafkaClusterNode(KafkaService):
    """One combined broker/controller node of the local replicated Kafka cluster."""

    def __init__(self, settings: Settings, node_id: int, nodes: int, cluster_id: Callable[[], str]) -> None:
        self.name = f"kafka-cluster/{node_id}"
        self.node_id = node_id
        self.nodes = nodes
        self.replication = min(3, nodes)
        self._cluster_id = cluster_id
        super().__init__(settings)

    @property
    def port(self) -> int:
        return self.settings.kafka_cluster_port + self.node_id - 1

    @property
    def controller_port(self) -> int:
        return self.settings.kafka_cluster_port + 100 + self.node_id - 1

    def voters(self) -> str:
        base = self.settings.kafka_cluster_port + 100
        return ",".join(f"{n}@127.0.0.1:{base + n - 1}" for n in range(1, self.nodes + 1))

    def cluster_id(self) -> str:
        return self._cluster_id()

    def _jvm_args(self) -> list[str]:  # a smaller heap each: three brokers share the machine with everything else
        return [arg if not arg.startswith(("-Xmx", "-Xms")) else arg[:4] + "512m" for arg in super()._jvm_args()]


class KafkaCluster:
    """A local Kafka cluster of ``brokers`` combined broker/controller KRaft nodes on loopback:
    ``streamproc infra up --kafka-brokers 3``. Topics made for it get replication factor 3 and
    ``min.insync.replicas=2`` (``STREAMPROC_TOPIC_REPLICATION=3``)."""

    def __init__(self, settings: Settings, brokers: int = 3) -> None:
        self.settings = settings
        self.dir = settings.state_dir / "kafka-cluster"
        self.nodes = [KafkaClusterNode(settings, n, brokers, self._cluster_id) for n in range(1, brokers + 1)]

    def _cluster_id(self) -> str:
        """One id for every node's storage, kept so a node formatted later joins the same cluster."""
        path = self.dir / "cluster-id"
        if not path.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            path.write_text(kafka_cluster_id())
        return path.read_text().strip()

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def up(self, timeout: float = 180.0) -> list[ServiceStatus]:
        for node in self.nodes:
            if not node.ready():
                node.start()
        for node in self.nodes:
            node.wait_ready(timeout, node.dir / "kafka.out")
        return self.status()

    def down(self) -> bool:
        return any([node.down() for node in self.nodes])

    def status(self) -> list[ServiceStatus]:
        return [node.status() for node in self.nodes]


def min_heap(heap: str) -> str:
    return "256m" if heap.endswith("g") or int(heap.rstrip("m") or 0) >= 256 else heap


def kafka_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, url-safe base64 without padding (22 chars). Like Kafka's own
    ``Uuid.randomUuid``, never one starting with ``-``: a parser reads that as an option (``-t -QRq0…`` in CI)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class Infra:
    def __init__(self, settings: Settings) -> None:
        self.redis = RedisService(settings)
        self.kafka = KafkaService(settings)
        self.redis_cluster = RedisCluster(settings)
        self.kafka_cluster = KafkaCluster(settings)

    def up(self, redis_cluster: bool = False, kafka_brokers: int = 1) -> list[ServiceStatus]:
        statuses = [self.redis.up(), self.kafka.up()]
        if redis_cluster:
            statuses += self.redis_cluster.up()
        if kafka_brokers > 1:
            self.kafka_cluster = KafkaCluster(self.redis.settings, kafka_brokers)
            statuses += self.kafka_cluster.up()
        return statuses

    def down(self) -> list[str]:
        stopped = []
        for svc in (self.kafka, self.redis):
            if svc.down():
                stopped.append(svc.name)
        if self.redis_cluster.down():
            stopped.append("redis-cluster")
        if self.kafka_cluster.down():
            stopped.append("kafka-cluster")
        return stopped

    def status(self) -> list[ServiceStatus]:
        running_cluster = [s for s in (*self.redis_cluster.status(), *self.kafka_cluster.status()) if s.running]
        return [self.redis.status(), self.kafka.status(), *running_cluster]
