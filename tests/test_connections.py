"""One reader per web process: Redis connections do not grow with SSE clients."""

from __future__ import annotations

import threading
import time

import httpx
import psutil
import pytest

from tests.helpers import start
from tests.stack import start_web

pytestmark = pytest.mark.e2e


def redis_connections(pid: int, redis_port: int) -> int:
    conns = psutil.Process(pid).net_connections(kind="tcp")
    return sum(
        1 for c in conns if c.raddr and c.raddr.port == redis_port and c.status == "ESTABLISHED"
    )


def open_streams(url: str, cookies, n: int, stop: threading.Event) -> list[threading.Thread]:
    def hold() -> None:
        with (
            httpx.Client(cookies=cookies, timeout=60) as client,
            client.stream("GET", url) as response,
        ):
            for _ in response.iter_raw():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def test_200_sse_clients_use_the_same_redis_connections_as_one(
    process_env, workdir, model_server, redis_client, key_prefix
):
    # A queue no worker reads: the answer stays queued and its streams open for as long as
    # the test needs. (A slow first token did not: with a worker running, the model's read
    # timeout ended the answer after 10 s, and with it every stream, while a loaded machine
    # was still opening the 199.)
    env = {**process_env, "TIDECHAT_CELERY_QUEUE": key_prefix + "connections-nobody"}
    web = start_web(env, workdir, name="web-connections")
    stop = threading.Event()
    try:
        port = redis_client.connection_pool.connection_kwargs.get("port", 6379)
        (pid,) = web.gunicorn_workers()
        model = model_server.script(chunks=["x"])
        with httpx.Client(base_url=web.url, timeout=30) as http:
            _, gen = start(http, model)
            url = web.url + gen["events_url"]
            open_streams(url, http.cookies, 1, stop)
            time.sleep(1.5)
            with_one = redis_connections(pid, port)
            open_streams(url, http.cookies, 199, stop)
            deadline = time.monotonic() + 20
            hub_count = 0
            while time.monotonic() < deadline and hub_count < 200:
                time.sleep(0.5)
                hub_count = len(
                    [
                        c
                        for c in psutil.Process(pid).net_connections("tcp")
                        if c.laddr.port == int(web.url.rsplit(":", 1)[1])
                    ]
                )
            assert hub_count >= 200
            with_many = redis_connections(pid, port)
        assert with_one == with_many
    finally:
        stop.set()
        web.stop()
