"""Deploys lose no answer: a worker SIGTERMed mid-answer finishes what ends within its drain
budget and hands the rest on; another worker continues each in the same stream and message,
with nothing repeated. Where the backend cannot continue, the answer ends ``interrupted``,
its text kept, and Continue finishes it."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.helpers import read_events, text
from tests.stack import start_worker

pytestmark = pytest.mark.e2e

CHUNKS = [f"w{i} " for i in range(50)]
FULL = "".join(CHUNKS)


def deploy_env(process_env: dict[str, str], name: str, continuation: str) -> dict[str, str]:
    queue = f"{process_env['TIDECHAT_CELERY_QUEUE']}-{name}"
    return {
        **process_env,
        "TIDECHAT_CELERY_QUEUE": queue,
        "TIDECHAT_DRAIN_SECONDS": "1",
        "TIDECHAT_CONTINUATION": continuation,
    }


def wsgi_client(app) -> httpx.Client:
    """An httpx client calling the app in-process, so the SSE helpers read its streams."""
    return httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://tidechat.test")


def started(client, gids: list[str], prefix: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    for gid in gids:
        while not client.get(f"/api/generations/{gid}").json()["text"].startswith(prefix):
            assert time.monotonic() < deadline, f"{gid} never got going"
            time.sleep(0.02)


def post_answers(client, model: str, n: int) -> list[dict]:
    gens = []
    for _ in range(n):
        cid = client.post("/api/conversations").json()["id"]
        body = {"content": "Count for me", "model": model}
        posted = client.post(f"/api/conversations/{cid}/messages", json=body)
        assert posted.status_code == 202, posted.text
        gens.append({**posted.json()["generation"], "cid": cid})
    return gens


def sigterm_and_wait(worker, within: float) -> float:
    began = time.monotonic()
    os.kill(worker.popen.pid, signal.SIGTERM)
    worker.popen.wait(within)
    return time.monotonic() - began


def test_sigterm_hands_answers_on_and_they_end_exact(make_app, model_server, process_env, workdir):
    env = deploy_env(process_env, "handoff", "completion")
    leaving = start_worker(env, workdir, name="worker-leaving")
    staying = None
    try:
        app = make_app(
            TIDECHAT_CELERY_QUEUE=env["TIDECHAT_CELERY_QUEUE"], TIDECHAT_CONTINUATION="completion"
        )
        # 10 s of answer: still running once the staying worker is up (it took over 5 s
        # to start on a loaded machine, and with 5 s of answer they were already over).
        model = model_server.script(chunks=CHUNKS, delay=0.2)
        with wsgi_client(app) as client:
            gens = post_answers(client, model, 3)
            started(client, [g["id"] for g in gens], "w0 w1 ")
            staying = start_worker(env, workdir, name="worker-staying")
            for gen in gens:  # the premise: SIGTERM comes mid-answer
                assert client.get(f"/api/generations/{gen['id']}").json()["status"] == "streaming"
            # Before: the answers ran on until the platform's SIGKILL and ended worker_lost.
            took = sigterm_and_wait(leaving, within=20)
            assert took < 10, f"the leaving worker took {took:.1f} s to stop"
            for gen in gens:
                events = read_events(client, gen["events_url"], timeout=30)
                assert events[-1].event == "done", events[-1]
                assert text(events) == FULL  # continued where it stopped: nothing repeated
                ids = [e.id for e in events]
                assert len(ids) == len(set(ids))
                view = client.get(f"/api/generations/{gen['id']}").json()
                assert (view["status"], view["text"]) == ("done", FULL)
                conv = client.get(f"/api/conversations/{gen['cid']}").json()
                assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
                assert conv["messages"][-1]["content"] == FULL
        continued = [r for r in model_server.requests_for(model) if "prompt" in r.body]
        assert len(continued) == 3  # a raw completion over the templated prompt + partial
        assert all(r.body["prompt"].endswith(" ") for r in continued)
        assert "worker_lost" not in leaving.output() + staying.output()
        assert "handed on" in leaving.output()
    finally:
        leaving.stop()
        if staying is not None:
            staying.stop()


def test_sigterm_without_continuation_interrupts_and_continue_finishes(
    make_app, model_server, process_env, workdir
):
    env = deploy_env(process_env, "interrupt", "none")
    leaving = start_worker(env, workdir, name="worker-interrupted")
    staying = None
    try:
        app = make_app(TIDECHAT_CELERY_QUEUE=env["TIDECHAT_CELERY_QUEUE"])
        model = model_server.script(chunks=CHUNKS, delay=0.1)
        with wsgi_client(app) as client:
            (gen,) = post_answers(client, model, 1)
            started(client, [gen["id"]], "w0 w1 ")
            assert sigterm_and_wait(leaving, within=20) < 10
            events = read_events(client, gen["events_url"], timeout=10)
            assert events[-1].event == "done"
            assert events[-1].data["finish_reason"] == "interrupted"
            partial = text(events)
            assert FULL.startswith(partial) and partial.startswith("w0 w1 ")
            message = client.get(f"/api/conversations/{gen['cid']}").json()["messages"][-1]
            assert (message["status"], message["content"]) == ("interrupted", partial)

            staying = start_worker(env, workdir, name="worker-continues")
            resumed = client.post(f"/api/generations/{gen['id']}/continue")
            assert resumed.status_code == 202, resumed.text
            new = resumed.json()["generation"]
            assert new["message_id"] == message["id"]
            events = read_events(client, new["events_url"], timeout=30)
            assert events[-1].event == "done"
            assert text(events) == FULL  # the text so far, then the rest
            conv = client.get(f"/api/conversations/{gen['cid']}").json()
            assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
            assert (conv["messages"][-1]["status"], conv["messages"][-1]["content"]) == (
                "done",
                FULL,
            )
            again = client.post(f"/api/generations/{new['id']}/continue")
            assert again.status_code == 409
            assert again.json()["error"]["code"] == "not_interrupted"
        assert "stopped unexpectedly" not in leaving.output()
    finally:
        leaving.stop()
        if staying is not None:
            staying.stop()
