"""How every process connects to Redis: one server, or a Redis Cluster.

``REDIS_URL`` says which: ``redis://`` / ``rediss://`` for one server, ``redis+cluster://``
/ ``rediss+cluster://`` (the scheme the ``limits`` library, which Flask-Limiter uses, also
takes) for a cluster, given by one or more of its nodes (``host1:port1,host2:port2``).
Every client the app makes comes from here.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster

_CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def is_cluster(url: str) -> bool:
    return url.startswith(_CLUSTER_SCHEMES)


def plain_url(url: str) -> str:
    """The URL with the cluster marker taken out (what redis-py's ``from_url`` reads)."""
    return url.replace("+cluster://", "://", 1) if is_cluster(url) else url


def seeds(url: str) -> tuple[str, list[ClusterNode]]:
    """A cluster URL's first node as a plain URL (its password, TLS and options), and
    every node it names: ``redis+cluster://[auth@]host1:port1,host2:port2``. A process that
    starts while one of them is down connects through another."""
    scheme, _, rest = plain_url(url).partition("://")
    auth, _, rest = rest.rpartition("@")
    hosts, sep, tail = rest.partition("/") if "/" in rest else rest.partition("?")
    nodes = []
    for hostport in hosts.split(","):
        host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
        nodes.append(ClusterNode(host, int(port or 6379)))
    first = f"{scheme}://{auth + '@' if auth else ''}{hosts.split(',')[0]}{sep}{tail}"
    return first, nodes


def node_url(url: str, host: str, port: int) -> str:
    """A plain URL of one cluster node, with the cluster URL's password, TLS and options."""
    first, _ = seeds(url)
    scheme, _, rest = first.partition("://")
    auth, at, rest = rest.rpartition("@")
    tail = rest[len(rest.split("/")[0].split("?")[0]) :]
    return f"{scheme}://{auth}{at}{host}:{port}{tail}"


def client(url: str, *, max_connections: int | None = None, **options: Any) -> Any:
    """A client for ``url``: ``redis.Redis`` on one server (its pool blocks, up to
    ``max_connections``, when that many are in use), ``RedisCluster`` on a cluster (which
    keeps a pool per node, of ``max_connections`` each, that blocks the same way)."""
    if is_cluster(url):
        if max_connections:
            options["max_connections"] = max_connections
            # As on one server: wait for a free connection rather than fail. redis-py's
            # default per-node pool raises "Too many connections" instead, which failed
            # hundreds of answers in a worker running 1000 at once.
            options.setdefault("connection_pool_class", redis.BlockingConnectionPool)
        first, nodes = seeds(url)
        return RedisCluster.from_url(first, startup_nodes=nodes, **options)
    if max_connections:
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=20, **options
        )
        return redis.Redis(connection_pool=pool)
    return redis.Redis.from_url(url, **options)


def slot_owner(url: str, key: str) -> tuple[str, int]:
    """The (host, port) of the cluster node that serves ``key``'s hash slot now."""
    cluster = client(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        node = cluster.get_node_from_key(key)
        return node.host, int(node.port)
    finally:
        cluster.close()
