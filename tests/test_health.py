"""Health: /healthz, /readyz with Redis or the database down, and the workers' heartbeat."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults import PrivateRedis
from tests.stack import ROOT, start_worker
from tidechat.stream_bus import StreamBus
from worker.stream_writer import Outbox, StreamWriter

OPERATOR = {"Authorization": "Bearer ops-secret"}


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path).start()
    yield server
    server.kill()


def test_healthz_answers_without_touching_redis_or_the_database(make_app, private_redis):
    app = make_app(REDIS_URL=private_redis.url, DATABASE_URL="postgresql://nobody@127.0.0.1:1/x")
    private_redis.kill()
    response = app.test_client().get("/healthz")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


def test_readyz_names_redis_when_it_is_down(make_app, private_redis):
    app = make_app(REDIS_URL=private_redis.url, TIDECHAT_READY_TIMEOUT="1")
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    private_redis.kill()
    started = time.monotonic()
    response = client.get("/readyz")
    assert time.monotonic() - started < 5
    assert response.status_code == 503
    body = response.get_json()
    assert body["failing"] == ["redis"] and body["checks"]["database"]["ok"] is True
    private_redis.start()
    assert client.get("/readyz").status_code == 200


def test_readyz_names_the_database_when_it_is_down(make_app, postgres_behind_proxy):
    url, proxy = postgres_behind_proxy
    client = make_app(DATABASE_URL=url, TIDECHAT_READY_TIMEOUT="1").test_client()
    assert client.get("/readyz").status_code == 200
    proxy.block()
    proxy.drop()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["failing"] == ["database"]
    proxy.unblock()
    assert client.get("/readyz").status_code == 200


@pytest.mark.e2e
def test_the_worker_heartbeat_shows_its_answers_and_vanishes_when_it_is_killed(
    make_app, process_env, workdir, model_server
):
    queue = f"health-{uuid.uuid4().hex[:8]}"
    env = {**process_env, "TIDECHAT_CELERY_QUEUE": queue, "TIDECHAT_HEARTBEAT_INTERVAL": "0.5"}
    worker = start_worker(env, workdir, "worker-health")
    app = make_app(
        TIDECHAT_CELERY_QUEUE=queue, TIDECHAT_HEARTBEAT_INTERVAL="0.5",
        TIDECHAT_OPS_TOKEN="ops-secret", TIDECHAT_OPS_ALLOW="",
    )  # fmt: skip
    client = app.test_client()

    def mine() -> list[dict]:
        body = client.get("/readyz", headers=OPERATOR).get_json()
        return [w for w in body["workers"] if w["pid"] == worker.popen.pid]

    try:
        wait_until(lambda: mine(), "the worker's first heartbeat")
        assert mine()[0]["healthy"] and mine()[0]["running"] == 0
        model = model_server.script(chunks=["a"] * 40, delay=0.2)
        cid = client.post("/api/conversations").get_json()["id"]
        sent = client.post(
            f"/api/conversations/{cid}/messages", json={"content": "slow", "model": model}
        )
        assert sent.status_code == 202
        wait_until(lambda: mine() and mine()[0]["running"] == 1, "the answer in the heartbeat")
        public = client.get("/readyz").get_json()  # not the operator: counts only
        assert "workers" not in public and public["worker_count"]["alive"] >= 1
        os.kill(worker.popen.pid, signal.SIGKILL)
        worker.popen.wait(10)
        wait_until(lambda: not mine(), "the killed worker to drop out", timeout=5)
    finally:
        worker.stop()


def test_a_worker_whose_stream_writer_fails_reports_itself_unhealthy(private_redis):
    from tidechat.redis_keys import RedisKeys

    r = private_redis.client()
    bus = StreamBus(r, RedisKeys("health:"), 60)
    writer = StreamWriter(bus, 0.0, retry_seconds=0.2)
    assert writer.healthy
    gid = uuid.uuid4().hex
    bus.create(gid)
    claim = bus.claim(gid, 5000)
    r.config_set("maxmemory", "1")  # every write refused: OOM
    box = Outbox(gid, claim.fence, claim.seq)
    writer.put(box, "text")
    writer.drain(box, timeout=10)
    assert box.failed and not writer.healthy
    r.config_set("maxmemory", "0")


def test_the_health_command_prints_the_report(settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDECHAT_")}
    env.update(settings)
    out = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "health"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert '"status": "ok"' in out.stdout and '"workers"' in out.stdout


def wait_until(check, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
