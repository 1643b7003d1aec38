"""Celery's broker on a Redis Cluster.

kombu has no Redis Cluster transport. Its Redis transport works unchanged against one
cluster node, as long as every key it touches lives in a hash slot that node serves: the
broker's keys all start with ``global_keyprefix``, which carries the app-wide hash tag
(``tidechat/redis_keys.py``), so they share one slot. This transport connects to the node
serving that slot, looked up from the seed node in the URL each time kombu (re)connects, so
after a failover it follows the slot to its new node.

Broker URL: ``tidechat-cluster://[:password@]host:port``, with ``REDIS_URL`` in the
transport option ``tidechat_cluster_url`` (both made by ``tidechat/config.py`` from a
``redis+cluster://`` ``REDIS_URL``).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from tidechat import redis_conn

SCHEME = "tidechat-cluster"


class Channel(kombu_redis.Channel):
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


class Transport(kombu_redis.Transport):
    Channel = Channel


def register() -> None:
    TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")


URL_OPTION = "tidechat_cluster_url"  # in broker_transport_options: REDIS_URL itself


def broker_url(redis_url: str) -> str:
    """The broker URL for a ``redis+cluster://`` ``REDIS_URL`` (kombu reads one host from
    it; the Channel finds the cluster through every node of ``URL_OPTION``)."""
    register()
    first, _ = redis_conn.seeds(redis_url)
    return SCHEME + "://" + first.split("://", 1)[1]
