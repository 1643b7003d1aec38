"""The one-command run: embedded Redis, the real SmolLM2 model, web and worker under honcho.

These start ``python -m tidechat.devserver`` (what ``bin/dev`` runs) with no REDIS_URL and
no OpenAI variables, exactly as a newcomer would, and talk to it over HTTP.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import redis

from tests.helpers import new_conversation, read_events, send, text
from tests.stack import ROOT, free_port
from tidechat.embedded import LOCAL_BACKEND_LABEL, LOCAL_MODEL

pytestmark = pytest.mark.e2e


@dataclass
class LocalApp:
    url: str
    proc: subprocess.Popen
    log: Path

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def child_named(self, name: str) -> psutil.Process:
        return next(p for p in self.descendants() if name in " ".join(p.cmdline()))

    def supervisor(self, what: str) -> psutil.Process:
        """The ``python -m tidechat.embedded <what>`` process that keeps a server up."""
        wanted = ["tidechat.embedded", what]
        return next(p for p in self.descendants() if p.cmdline()[-2:] == wanted)

    def supervised(self, what: str, timeout: float = 30) -> psutil.Process:
        """The server under that supervisor, once it listens."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for child in self.supervisor(what).children():
                with contextlib.suppress(psutil.Error):
                    if any(c.status == "LISTEN" for c in child.net_connections("tcp")):
                        return child
            time.sleep(0.2)
        raise AssertionError(f"no {what} server listening; log:\n{self.log.read_text()[-3000:]}")


def wait_dead(proc: psutil.Process, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    with contextlib.suppress(psutil.NoSuchProcess):
        while proc.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, f"{proc.pid} still running"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def local_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalApp]:
    instance = tmp_path_factory.mktemp("instance")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TIDECHAT_", "OPENAI_")) and k != "REDIS_URL"
    }
    port = free_port()
    env.update(PORT=str(port), TIDECHAT_INSTANCE_PATH=str(instance), PYTHONUNBUFFERED="1")
    log = instance / "dev.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tidechat.devserver"],
            cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    app = LocalApp(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        try:
            catalog = httpx.get(app.url + "/api/models", timeout=2).json()
            if catalog["models"] == [LOCAL_MODEL]:  # listed by the model server itself
                break
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    yield app
    if proc.poll() is None:  # a test stopped it already, else stop it like Ctrl-C would
        # honcho puts each child in its own process group: reach them by pid if it fails.
        children = app.descendants()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


@pytest.fixture
def local_http(local_app: LocalApp) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=local_app.url, timeout=60) as client:
        yield client


def test_page_names_the_local_model_and_backend(local_http):
    catalog = local_http.get("/api/models").json()
    assert catalog == {
        "default": LOCAL_MODEL, "models": [LOCAL_MODEL], "backend": LOCAL_BACKEND_LABEL,
    }  # fmt: skip
    assert local_http.get("/").status_code == 200


def test_real_model_answers_and_stream_equals_stored(local_http):
    cid = new_conversation(local_http)
    gen = send(local_http, cid, "Count from 1 to 10.", LOCAL_MODEL)
    events = read_events(local_http, gen["events_url"], timeout=120)
    assert events[-1].event == "done", events[-1]
    answer = text(events)
    assert answer.strip()
    stored = local_http.get(f"/api/conversations/{cid}").json()["messages"][-1]
    assert stored["content"] == answer
    assert stored["status"] == "done"


def test_two_answers_at_once_both_finish(local_http, local_app):
    # llama.cpp's server by default ends a running stream (with no finish_reason) as soon
    # as another request arrives, so a second chat, or the page's model list, cut the first
    # answer short ("upstream_incomplete"). Requests must queue instead.
    first = send(local_http, new_conversation(local_http), "Name three fish.", LOCAL_MODEL)
    read_events(local_http, first["events_url"], limit=2)  # the first answer is streaming
    second = send(local_http, new_conversation(local_http), "Name three birds.", LOCAL_MODEL)
    for gen in (first, second):
        events = read_events(local_http, gen["events_url"], timeout=120)
        assert events[-1].event == "done", events[-1]
        assert events[-1].data["finish_reason"] in ("stop", "length")
        assert text(events).strip()


def test_real_model_resume_mid_answer_yields_exactly_the_rest(local_http):
    cid = new_conversation(local_http)
    gen = send(local_http, cid, "Write three sentences about the ocean.", LOCAL_MODEL)
    head = read_events(local_http, gen["events_url"], limit=5)
    tail = read_events(local_http, gen["events_url"], cursor=head[-1].id, timeout=120)
    full = read_events(local_http, gen["events_url"], timeout=120)
    assert head + tail == full
    stored = local_http.get(f"/api/conversations/{cid}").json()["messages"][-1]
    assert text(full) == stored["content"]


def test_real_model_through_the_openai_api_resumes_exactly(local_http, local_app):
    """The /v1 Responses API over the real local model: a background stream cut after a
    few words and resumed with the official SDK gives exactly the stored answer."""
    key = local_http.post("/api/keys", json={"name": "local"}).json()["key"]
    client = openai.OpenAI(base_url=local_app.url + "/v1", api_key=key, timeout=120)
    stream = client.responses.create(
        model=LOCAL_MODEL, input="Write three sentences about the tide.", background=True,
        stream=True,
    )  # fmt: skip
    head = []
    for event in stream:
        head.append(event)
        if sum(e.type == "response.output_text.delta" for e in head) == 3:
            break
    stream.close()
    rest = list(
        client.responses.retrieve(head[0].response.id, stream=True,
                                  starting_after=head[-1].sequence_number)
    )  # fmt: skip
    assert rest[-1].type in ("response.completed", "response.incomplete")
    final = client.responses.retrieve(head[0].response.id)
    assert delta_text(head) + delta_text(rest) == final.output_text
    assert final.output_text.strip()


def delta_text(events: list) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_real_model_stop(local_http):
    cid = new_conversation(local_http)
    gen = send(local_http, cid, "Write a very long story about a lighthouse keeper.", LOCAL_MODEL)
    head = read_events(local_http, gen["events_url"], limit=3)
    assert local_http.post(gen["cancel_url"]).status_code in (200, 202)
    rest = read_events(local_http, gen["events_url"], cursor=head[-1].id, timeout=30)
    assert rest[-1].event == "done"
    assert rest[-1].data["finish_reason"] == "cancelled"
    stored = local_http.get(f"/api/conversations/{cid}").json()["messages"][-1]
    assert stored["status"] == "cancelled"
    assert stored["content"] == text(head + rest)


def test_real_model_continues_a_partial_answer_where_it_stopped(local_app):
    """What a worker that takes over a deploy's handed-on answer sends: a raw completion
    over the ChatML prompt plus the partial answer; llama.cpp goes on from there."""
    from worker import model_client

    port = next(
        p.environ()["EMBEDDED_MODEL_PORT"]
        for p in local_app.descendants()
        if "EMBEDDED_MODEL_PORT" in p.environ()
    )
    config = {"OPENAI_API_KEY": "", "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
              "OPENAI_TIMEOUT": 60, "OPENAI_MAX_RETRIES": 0, "OPENAI_KEEPALIVE": 60}  # fmt: skip
    question = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    request = model_client.Request(
        LOCAL_MODEL, question, temperature=0, max_tokens=24,
        prefix="1, 2, 3, 4, 5, 6, 7,", continuation="completion",
    )  # fmt: skip
    parts, finish = [], None
    with model_client.open_stream(model_client.make_client(config), request) as stream:
        for event in model_client.events(stream):
            if isinstance(event, model_client.TextDelta):
                parts.append(event.text)
            elif isinstance(event, model_client.Finish):
                finish = event.reason
    rest = "".join(parts)
    assert finish in ("stop", "length")
    assert rest.lstrip().startswith("8"), rest  # on from 7, not from the start


def test_embedded_redis_serves_web_and_worker(local_app):
    server = local_app.child_named("redis-server")
    (port,) = {c.laddr.port for c in server.net_connections("tcp") if c.status == "LISTEN"}
    clients = redis.Redis(port=port).client_list()
    peers = {int(c["addr"].rsplit(":", 1)[1]) for c in clients}

    def uses_redis(proc: psutil.Process) -> bool:
        conns = proc.net_connections("tcp")
        return any(c.raddr and c.raddr.port == port and c.laddr.port in peers for c in conns)

    web = [p for p in local_app.descendants() if "gunicorn" in " ".join(p.cmdline())]
    worker = local_app.child_named("celery")
    assert any(uses_redis(p) for p in web)
    assert uses_redis(worker)


def test_model_crash_keeps_the_app_up_and_answers_say_the_model_is_down(local_http, local_app):
    supervisor, server = local_app.supervisor("model"), local_app.supervised("model")
    supervisor.suspend()  # hold the restart, so the app is seen with its model down
    try:
        server.kill()
        wait_dead(server)  # a zombie until its (stopped) supervisor reaps it
        cid = new_conversation(local_http)
        gen = send(local_http, cid, "Hello?", LOCAL_MODEL)
        events = read_events(local_http, gen["events_url"], timeout=60)
        assert events[-1].event == "error"
        assert events[-1].data["code"] == "upstream_unreachable"
        assert "llama.cpp (local)" in events[-1].data["message"]
        assert "is down" in events[-1].data["message"]
        assert local_http.get("/").status_code == 200
        assert local_http.get("/api/conversations").status_code == 200
        assert local_app.proc.poll() is None
    finally:
        supervisor.resume()
    restarted = local_app.supervised("model")
    assert restarted.pid != server.pid
    log = local_app.log.read_text()
    assert "model server stopped (killed by SIGKILL)" in log
    assert "restarting model server in 1 s" in log
    gen = send(local_http, cid, "Say hello.", LOCAL_MODEL)
    events = read_events(local_http, gen["events_url"], timeout=120)
    assert events[-1].event == "done", events[-1]
    assert text(events).strip()


def test_embedded_redis_crash_is_restarted_and_the_app_goes_on(local_http, local_app):
    server = local_app.supervised("redis")
    server.kill()
    wait_dead(server)
    restarted = local_app.supervised("redis")
    assert restarted.pid != server.pid
    assert "redis stopped (killed by SIGKILL)" in local_app.log.read_text()
    deadline = time.monotonic() + 30
    while True:  # web and worker reconnect on their own
        with contextlib.suppress(httpx.HTTPError):
            if local_http.post("/api/conversations").status_code == 201:
                break
        assert time.monotonic() < deadline, "the app did not come back after Redis restarted"
        time.sleep(0.5)
    cid = new_conversation(local_http)
    gen = send(local_http, cid, "Name a colour.", LOCAL_MODEL)
    events = read_events(local_http, gen["events_url"], timeout=120)
    assert events[-1].event == "done", events[-1]
    assert local_app.proc.poll() is None


def test_terminal_shows_what_a_user_needs_not_the_loader_log(local_app):
    log = local_app.log.read_text()
    assert f"Tidechat is running: {local_app.url}/" in log
    assert f"{LOCAL_MODEL} on {LOCAL_BACKEND_LABEL}" in log
    assert "Ctrl-C stops everything." in log
    assert "llama_model_loader" not in log  # one line per tensor with verbose on
    assert len(log.splitlines()) < 150, log


def test_ctrl_c_stops_every_process(local_app):
    """Last in this module: stops the app and checks nothing is left behind."""
    children = local_app.descendants()
    redis_port = next(
        c.laddr.port
        for c in local_app.child_named("redis-server").net_connections("tcp")
        if c.status == "LISTEN"
    )
    assert len(children) >= 4
    os.kill(local_app.proc.pid, signal.SIGINT)
    local_app.proc.wait(30)
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert alive == []
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=redis_port, socket_connect_timeout=1).ping()
