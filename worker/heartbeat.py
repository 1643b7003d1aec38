"""The worker's heartbeat: every few seconds each worker process says in Redis that it is
alive, how many answers it is running, and whether its stream writer and lease keeper
work. A worker that stops beating (killed, frozen, cut off from Redis) drops out of the
list within ``3 × HEARTBEAT_INTERVAL``; one that beats with a broken part says so.

Read by :func:`alive` (``/readyz`` and ``flask --app app health``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import redis
from celery.signals import worker_ready
from flask import Flask

from tidechat import redis_conn
from tidechat.redis_keys import RedisKeys
from tidechat.stream_bus import process_name

log = logging.getLogger(__name__)
_started: set[int] = set()


def worker_id() -> str:
    return process_name()


def status(app: Flask) -> dict[str, Any]:
    """This process's answers and parts, as the heartbeat reports them."""
    from worker.tasks import runtime_for  # the task module imports the model client

    runtime = runtime_for(app)
    writer, keeper = runtime.writer.healthy, runtime.keeper.healthy
    return {
        "id": worker_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "running": runtime.keeper.count,
        "draining": runtime.keeper.draining,
        "stream_writer": "ok" if writer else "failing",
        "lease_keeper": "ok" if keeper else "failing",
        "healthy": writer and keeper,
    }


def beat(app: Flask, r: redis.Redis) -> None:
    """Publish this process's status once."""
    keys: RedisKeys = app.extensions["redis_keys"]
    interval = float(app.config["HEARTBEAT_INTERVAL"])
    info = {**status(app), "at": time.time()}
    ttl = max(1, int(3 * interval + 0.999))
    with r.pipeline(transaction=False) as pipe:
        pipe.hset(keys.worker(info["id"]), mapping={k: str(v) for k, v in info.items()})
        pipe.expire(keys.worker(info["id"]), ttl)
        pipe.zadd(keys.workers(), {info["id"]: info["at"]})
        pipe.zremrangebyscore(keys.workers(), "-inf", info["at"] - 3 * interval)
        pipe.execute()


def start(app: Flask) -> None:
    """Beat every ``HEARTBEAT_INTERVAL`` seconds, from a thread of this process."""
    if id(app) in _started:
        return
    _started.add(id(app))
    r = redis_conn.client(app.config["REDIS_URL"], socket_timeout=5, socket_connect_timeout=5)
    interval = float(app.config["HEARTBEAT_INTERVAL"])

    def run() -> None:
        while True:
            try:
                beat(app, r)
            except redis.RedisError as exc:
                log.warning("heartbeat: Redis unavailable (%s)", exc)
            except Exception:
                log.exception("heartbeat failed")
            time.sleep(interval)

    threading.Thread(target=run, name="heartbeat", daemon=True).start()


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    app = getattr(getattr(sender, "app", None), "flask_app", None)
    if app is not None:
        start(app)


def alive(app: Flask, r: redis.Redis) -> list[dict[str, Any]]:
    """The workers whose heartbeat is recent, each as it last reported."""
    keys: RedisKeys = app.extensions["redis_keys"]
    interval = float(app.config["HEARTBEAT_INTERVAL"])
    ids = [i.decode() for i in r.zrangebyscore(keys.workers(), time.time() - 3 * interval, "+inf")]
    with r.pipeline(transaction=False) as pipe:
        for wid in ids:
            pipe.hgetall(keys.worker(wid))
        found = pipe.execute()
    out = []
    for raw in found:
        if not raw:
            continue  # expired between the two reads
        info = {k.decode(): v.decode() for k, v in raw.items()}
        out.append(
            {
                "id": info["id"],
                "host": info["host"],
                "pid": int(info["pid"]),
                "running": int(info["running"]),
                "draining": info["draining"] == "True",
                "stream_writer": info["stream_writer"],
                "lease_keeper": info["lease_keeper"],
                "healthy": info["healthy"] == "True",
                "seen_s_ago": round(max(0.0, time.time() - float(info["at"])), 1),
            }
        )
    return sorted(out, key=lambda w: w["id"])
