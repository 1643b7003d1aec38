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

**Acks written a moment later.** Tasks are acknowledged as they start
(``task_acks_late`` off), and kombu's ack is a ``MULTI``/``EXEC`` round trip that the task
waited for before its first line: about 1 ms of a lone answer's start, and in a burst one
round trip per task. Under gevent (the worker's pool) the ack is taken off the task's way
(:class:`QoS`): noted at once, and written ``ACK_WAIT`` later by a greenlet, with every ack
noted meanwhile, in one round trip (Celery's own start of a burst of ten: 7.8 -> 4.7 ms,
docs/benchmarks.md). An ack that never reaches Redis (the worker killed in that moment,
Redis down) leaves its task to be delivered again after the visibility timeout, which is
harmless: only one run can claim a generation. A closing channel (a worker stopping)
writes its pending acks first.

``settings(REDIS_URL)`` gives Celery's broker settings for either (``tidechat/config.py``).
Broker URL on one server: ``REDIS_URL`` itself, with this transport named by
``broker_transport``. On a cluster: ``tidechat-cluster://[:password@]host:port``, with
``REDIS_URL`` in the transport option ``tidechat_cluster_url``.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

import gevent
from gevent import monkey
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from tidechat import redis_conn

log = logging.getLogger(__name__)

SCHEME = "tidechat-redis"
CLUSTER_SCHEME = "tidechat-cluster"
URL_OPTION = "tidechat_cluster_url"  # in broker_transport_options: REDIS_URL itself


# How long an ack waits for others to go with it: a burst's tasks start one after another,
# a fraction of a millisecond apart.
ACK_WAIT = 0.005


def _deferring() -> bool:
    """Whether acks can wait for a greenlet: only where gevent runs every wait (a worker
    with the gevent pool). Elsewhere nothing would run the greenlet: acks go at once."""
    return monkey.is_module_patched("socket")


class QoS(kombu_redis.QoS):
    """kombu's ack emulation, with each ack written by a greenlet, many in one round trip
    (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: list[str] = []  # noted, not yet written: a greenlet will write them
        self._deferring = _deferring()

    def ack(self, delivery_tag: str) -> None:
        if not self._deferring:
            return super().ack(delivery_tag)
        self._quick_ack(delivery_tag)  # out of the prefetch count now, as kombu's ack does
        if not self._acks:  # the first since the last write: it takes the others along
            gevent.spawn_later(ACK_WAIT, self.write_acks)
        self._acks.append(delivery_tag)

    def write_acks(self) -> None:
        """Write the acks noted so far, in one round trip. Never raises: an ack that is
        not written costs a harmless second delivery (see the module's docstring)."""
        tags, self._acks = self._acks, []
        if not tags:
            return
        try:
            with self.pipe_or_acquire() as pipe:
                for tag in tags:
                    self._remove_from_indices(tag, pipe)
                pipe.execute()
        except Exception:  # noqa: BLE001
            log.warning(
                "could not acknowledge %d started tasks; they are delivered again after "
                "the visibility timeout, and skipped", len(tags), exc_info=True,
            )  # fmt: skip


class Channel(kombu_redis.Channel):
    QoS = QoS
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the BRPOP client: kombu keeps one already
            return super()._create_client(asynchronous=True)
        client = self._shared_client
        # kombu drops its pool on a connection error and builds a new one: follow it.
        if client is None or client.connection_pool is not self.pool:
            client = self._shared_client = super()._create_client()
        return client

    def close(self) -> None:
        if isinstance(self._qos, QoS) and not self.closed:
            self._qos.write_acks()  # before kombu lets go of its connections
        super().close()


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
