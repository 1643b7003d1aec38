"""Celery's broker as a worker uses it (``tidechat/broker.py``): a task stays in kombu's
unacked bookkeeping until its ack and comes back if its worker goes away before that, with
the channel's one redis-py client doing the bookkeeping."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys

import pytest
from celery import Celery
from kombu import Consumer, Queue

from tests.helpers import BUSY_GREENLET
from tidechat import broker, limits
from worker import enqueue_generation


@pytest.fixture
def app(make_app, key_prefix, redis_client):
    # A queue no worker reads: only this test's consumer takes from it.
    app = make_app(TIDECHAT_CELERY_QUEUE=key_prefix + "broker-check")
    yield app
    redis_client.delete(*queue_lists(app))


def queue_lists(app) -> list[str]:
    keys = app.extensions["redis_keys"]
    return limits.queue_names(keys.celery_queue(app.config["CELERY_QUEUE"]))


def unacked(app, redis_client, tag: str) -> tuple[bool, bool]:
    """Whether the unacked hash and its index hold ``tag``."""
    prefix = app.extensions["redis_keys"].celery_prefix()
    return (
        redis_client.hexists(prefix + "unacked", tag),
        redis_client.zscore(prefix + "unacked_index", tag) is not None,
    )


def take_one(app, conn, ack: bool) -> tuple[str, str]:
    """Consume one task from the app's queue: (its generation id, its delivery tag)."""
    got = []

    def on_message(body, message) -> None:
        got.append(message)

    queue = Queue(app.config["CELERY_QUEUE"])
    with Consumer(conn.default_channel, [queue], callbacks=[on_message], accept=["json"]):
        conn.drain_events(timeout=5)
    (message,) = got
    if ack:
        message.ack()
    args, _kwargs, _embed = message.decode()
    return args[0], message.delivery_tag


def test_a_task_is_bookkept_until_acked_and_redelivered_if_its_worker_goes(app, redis_client):
    celery_app = app.extensions["celery"]
    with app.app_context():
        enqueue_generation(app, "gen-acked")
        enqueue_generation(app, "gen-dropped")

    with celery_app.connection_for_read() as conn:
        assert isinstance(conn.default_channel, broker.Channel)
        gid, tag = take_one(app, conn, ack=True)
        assert gid == "gen-acked"
        assert unacked(app, redis_client, tag) == (False, False)

        gid, tag = take_one(app, conn, ack=False)
        assert gid == "gen-dropped"
        assert unacked(app, redis_client, tag) == (True, True)
    # The connection closed with the task unacknowledged (a worker stopping): it is back
    # on its queue, and out of the bookkeeping.
    assert unacked(app, redis_client, tag) == (False, False)
    with celery_app.connection_for_read() as conn:
        assert take_one(app, conn, ack=True)[0] == "gen-dropped"


# The worker's way (a gevent process): take tasks, ack each as it starts, and see what the
# ack costs the task and when it reaches Redis. A busy greenlet counts how often an ack lets
# the hub run something else, which it does when it waits for Redis.
ACKS = """
from gevent import monkey; monkey.patch_all()
import json, gevent, redis
from kombu import Consumer, Queue
from app import create_app
from tests.test_broker import unacked
from worker import enqueue_generation

app = create_app({"TESTING": True})
r = redis.Redis.from_url(app.config["REDIS_URL"])
def in_bookkeeping(tags):
    return [any(unacked(app, r, t)) for t in tags]
BUSY_GREENLET
with app.app_context():
    for gid in ("gen-1", "gen-2", "gen-3", "gen-4"):
        enqueue_generation(app, gid)
out = {}
celery_app = app.extensions["celery"]
with celery_app.connection_for_read() as conn:
    got = []
    queue = Queue(app.config["CELERY_QUEUE"])
    with Consumer(conn.default_channel, [queue], callbacks=[lambda b, m: got.append(m)],
                  accept=["json"]):
        while len(got) < 4:
            conn.drain_events(timeout=5)
        tags = [m.delivery_tag for m in got]
        out["delivered"] = in_bookkeeping(tags)
        spinner = gevent.spawn(busy)
        gevent.sleep(0)  # (it runs once)
        ticks = 0
        got[0].ack(); got[1].ack()
        out["ticks_during_acks"] = ticks
        spinner.kill()
        gevent.sleep(0.2)
        out["after_a_moment"] = in_bookkeeping(tags)
        got[2].ack(); got[3].ack()
# (closed at once: the worker stopping right after two tasks started)
out["after_close"] = in_bookkeeping(tags)
with celery_app.connection_for_read() as conn:
    with Consumer(conn.default_channel, [queue], callbacks=[lambda b, m: got.append(m)],
                  accept=["json"]):
        try:
            conn.drain_events(timeout=1)
        except TimeoutError:
            pass
out["delivered_again"] = len(got) - 4
print(json.dumps(out))
"""


def test_an_ack_does_not_hold_up_its_task_and_still_reaches_redis(app, process_env):
    """Tasks are acked as they start. kombu's ack waited for a Redis round trip before the
    task's first line (about 1 ms of a lone answer's start); in the worker's gevent process
    it is now written a moment later, several in one round trip, and a closing channel
    writes what is pending: a started task is not delivered again."""
    env = {**process_env, "TIDECHAT_CELERY_QUEUE": app.config["CELERY_QUEUE"]}
    run = subprocess.run(
        [sys.executable, "-c", ACKS.replace("BUSY_GREENLET", BUSY_GREENLET)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.splitlines()[-1]) == {
        "delivered": [True] * 4,
        "ticks_during_acks": 0,
        "after_a_moment": [False, False, True, True],
        "after_close": [False] * 4,
        "delivered_again": 0,
    }


def test_the_channel_reuses_one_client_until_kombu_replaces_its_pool(app):
    with app.extensions["celery"].connection_for_read() as conn:
        channel = conn.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.connection_pool is channel.pool
        channel._pool = None  # what kombu does after a connection error
        with channel.conn_or_acquire() as third:
            assert third is not first
            assert third.connection_pool is channel.pool


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://h:6379/0", {"broker_url": "redis://h:6379/0", "broker_transport": broker.SCHEME}),
        (
            "rediss://:pw@h:6380/0",
            {
                "broker_url": "rediss://:pw@h:6380/0",
                "broker_transport": broker.SCHEME,
                "broker_use_ssl": {"ssl_cert_reqs": ssl.CERT_NONE},  # kombu's own default
            },
        ),
        (
            "rediss://h:6380/0?ssl_cert_reqs=required",  # the URL's TLS options decide
            {
                "broker_url": "rediss://h:6380/0?ssl_cert_reqs=required",
                "broker_transport": broker.SCHEME,
            },
        ),
        ("redis+socket:///tmp/r.sock", {"broker_url": "redis+socket:///tmp/r.sock"}),
    ],
)
def test_broker_settings_for_one_server(url, expected):
    assert broker.settings(url) == (expected, {})


def test_broker_settings_for_a_cluster():
    url = "redis+cluster://:pw@h1:7000,h2:7001"
    assert broker.settings(url) == (
        {"broker_url": broker.CLUSTER_SCHEME + "://:pw@h1:7000"},
        {broker.URL_OPTION: url},
    )


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pw@h:6379/2",
        "rediss://:pw@h:6380/0",
        "rediss://h:6380/0?ssl_cert_reqs=required",
        "rediss://h:6380/0?ssl_cert_reqs=optional&ssl_ca_certs=/etc/ca.pem",
        "rediss://h:6380/0?ssl_ca_certs=/etc/ca.pem",
    ],
)
def test_celery_connects_where_and_how_kombus_own_transport_would(url):
    """Only the transport class changes: the same server, database, password and TLS."""

    def connection(**conf):
        celery_app = Celery("broker-check")
        celery_app.conf.update(conf)
        return celery_app.connection_for_read()

    settings, _ = broker.settings(url)
    ours, kombus = connection(**settings), connection(broker_url=url)
    assert ours.transport_cls == broker.SCHEME
    assert ours.transport.Channel is broker.Channel

    def where(conn):
        return conn.hostname, conn.port, conn.virtual_host, conn.password, conn.ssl

    assert where(ours) == where(kombus)
