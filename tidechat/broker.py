"""Celery's broker: kombu's Redis transport, one redis-py client per channel, and a mode
for Redis Cluster.

**One client.** kombu's Redis channel builds a new redis-py client for every command it
sends outside its ``BRPOP`` loop: twice per task in a worker (the delivery's bookkeeping in
the unacked hash, then the ack). A client holds no connection (those come from the
channel's pool), but building one costs about 90 µs of CPU (its command table, an event
dispatcher with its lock): 4 % of a worker's CPU in a burst of answers (py-spy). This
channel builds its synchronous client once per connection pool and reuses it; pipelines
and connections are still taken per use, as before.

**Redis Cluster.** kombu has no Redis Cluster transport. Its Redis transport works unchanged
against one cluster node, as long as every key it touches lives in a hash slot that node
serves: the broker's keys all start with ``global_keyprefix``, which carries the app-wide
hash tag (``tidechat/redis_keys.py``), so they share one slot. The cluster transport
connects to the node serving that slot, looked up from the seed node in the URL each time
kombu (re)connects, so after a failover it follows the slot to its new node.

``settings(REDIS_URL)`` gives Celery's broker settings for either (``tidechat/config.py``).
Broker URL on one server: ``REDIS_URL`` itself, with this transport named by
``broker_transport``. On a cluster: ``tidechat-cluster://[:password@]host:port``, with
``REDIS_URL`` in the transport option ``tidechat_cluster_url``.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from tidechat import redis_conn

SCHEME = "tidechat-redis"
CLUSTER_SCHEME = "tidechat-cluster"
URL_OPTION = "tidechat_cluster_url"  # in broker_transport_options: REDIS_URL itself


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the BRPOP client: kombu keeps one already
            return super()._create_client(asynchronous=True)
        client = self._shared_client
        # kombu drops its pool on a connection error and builds a new one: follow it.
        if client is None or client.connection_pool is not self.pool:
            client = self._shared_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


class ClusterChannel(Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params = super()._connparams(asynchronous)
        # Every seed node of REDIS_URL, not only the one in the broker URL.
        seed = self.connection.client.transport_options.get(URL_OPTION)
        if not seed:
            auth = ""
            if params.get("password"):
                auth = f"{params.get('username') or ''}:{params['password']}@"
            seed = f"redis+cluster://{auth}{params['host']}:{params['port']}"
        params["host"], params["port"] = redis_conn.slot_owner(seed, self.global_keyprefix)
        params["db"] = 0  # a cluster has database 0 only
        return params


class ClusterTransport(kombu_redis.Transport):
    Channel = ClusterChannel


def register() -> None:
    TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")
    TRANSPORT_ALIASES.setdefault(CLUSTER_SCHEME, f"{__name__}:ClusterTransport")


def settings(redis_url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Celery's broker settings for ``REDIS_URL``, and what goes into its
    ``broker_transport_options``."""
    register()
    if redis_conn.is_cluster(redis_url):
        first, _ = redis_conn.seeds(redis_url)  # kombu reads one host from the URL
        broker_url = CLUSTER_SCHEME + "://" + first.split("://", 1)[1]
        return {"broker_url": broker_url}, {URL_OPTION: redis_url}
    url = urlsplit(redis_url)
    if url.scheme not in ("redis", "rediss"):  # e.g. redis+socket://: kombu's own transport
        return {"broker_url": redis_url}, {}
    found: dict[str, Any] = {"broker_url": redis_url, "broker_transport": SCHEME}
    if url.scheme == "rediss" and "ssl_cert_reqs" not in parse_qs(url.query):
        # What kombu does for a rediss:// URL without TLS options, which it recognises by
        # its transport's name; the URL's own ssl_* options still win.
        found["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_NONE}
    return found, {}
