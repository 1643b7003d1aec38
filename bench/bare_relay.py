"""A second baseline: the mission's hops, with nothing else on them.

The model → a worker process → a Redis Stream per answer → a web process → SSE, as
Tidechat relays a token, but none of what Tidechat does besides: no Celery (a job is an
``LPUSH``), no database, no ownership, limits, leases, resume cursors or metrics; one
``XADD`` per delta and one blocking ``XREAD`` per client. The model is read exactly as the
proxy and Tidechat's worker read it (``worker.model_client``) and the wire is the proxy's,
so the three differ only in what lies between the model and the client.

Where the proxy is the floor of any relay, this is the floor of the mission's shape (two
processes and Redis per token). ``docs/benchmarks.md`` measures Tidechat against both.

Web: ``gunicorn -c gunicorn.conf.py 'bench.bare_relay:create_app()'``.
Worker: ``python -m bench.bare_relay`` (a gevent process). Both read ``REDIS_URL``,
``OPENAI_BASE_URL`` and ``TIDECHAT_KEY_PREFIX`` (the bench run's key prefix).
"""

if __name__ == "__main__":  # the worker: gevent patches the standard library first
    from gevent import monkey

    monkey.patch_all()

# ruff: noqa: E402
import os
import sys
import uuid
from collections.abc import Iterator

import gevent
import orjson
import redis
from flask import Flask

from bench import proxy
from tidechat.sse import ServerSentEvent
from tidechat.stream_bus import dumps
from worker import model_client

READY_LINE = "bare relay worker ready"
BLOCK_MS = 30_000
TTL_S = 600
MAX_CONNECTIONS = 20_000


def _keys() -> tuple[str, str]:
    """The job list, and the prefix of each answer's stream."""
    prefix = os.environ.get("TIDECHAT_KEY_PREFIX", "") + "bare:"
    return prefix + "jobs", prefix + "answer:"


def _redis() -> redis.Redis:
    # One connection per blocked XREAD (or per answer's XADD in flight): the pool grows with
    # the clients, there is no hub (redis-py's default cap is 100). No socket timeout: its
    # reads block (redis-py's default of 5 s would cut them).
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    return redis.Redis.from_url(url, socket_timeout=None, max_connections=MAX_CONNECTIONS)


def create_app() -> Flask:
    r = _redis()
    jobs, answer = _keys()

    def start(model: str) -> Iterator[bytes]:
        key = answer + uuid.uuid4().hex
        r.lpush(jobs, dumps({"key": key, "model": model}))
        return tail(r, key)

    return proxy.stream_app(__name__, start)


def tail(r: redis.Redis, key: str) -> Iterator[bytes]:
    """The answer's events from its stream's start: every entry one blocking ``XREAD``
    returns goes out in one write."""
    yield proxy.RETRY
    cursor: bytes | str = "0-0"
    while True:
        reply = r.xread({key: cursor}, block=BLOCK_MS)
        if not reply:
            yield b": ping\n\n"
            continue
        frames, ended = [], False
        for eid, fields in reply[0][1]:
            cursor = eid
            if b"t" in fields:
                event, data = "delta", dumps({"text": fields[b"t"].decode()})
            else:
                event = "done" if b"done" in fields else "error"
                data, ended = fields[event.encode()].decode(), True
            frames.append(ServerSentEvent(id=eid.decode(), event=event, data=data))
        yield b"".join(frame.encode() for frame in frames)
        if ended:
            return


def work() -> None:
    """Take jobs one by one, each answer in a greenlet of its own."""
    r = _redis()
    jobs, _ = _keys()
    clients = proxy.model_clients()
    print(READY_LINE, flush=True)
    while True:
        _, job = r.brpop([jobs])
        gevent.spawn(relay, r, clients, job)


def relay(r: redis.Redis, clients: model_client.ClientShards, job: bytes) -> None:
    """One answer: each delta one ``XADD``, then its end."""
    spec = orjson.loads(job)
    key, finish = spec["key"], None
    request = model_client.Request(spec["model"], [{"role": "user", "content": "Hi"}])
    try:
        with clients.lend() as client, model_client.open_stream(client, request) as upstream:
            for event in model_client.events(upstream):
                if isinstance(event, model_client.TextDelta):
                    r.xadd(key, {"t": event.text})
                elif isinstance(event, model_client.Finish):
                    finish = event.reason
        end = {"done": dumps({"finish_reason": finish, "usage": None})}
    except Exception as exc:  # noqa: BLE001 (its client must see an end, never hang)
        error = model_client.classify(exc)
        end = {"error": dumps(error.payload())}
    with r.pipeline(transaction=False) as pipe:
        pipe.xadd(key, end)
        pipe.expire(key, TTL_S)
        pipe.execute()


if __name__ == "__main__":
    sys.exit(work())
