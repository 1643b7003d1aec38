"""Structured logs: with LOG_FORMAT=json every line of the web process (gunicorn's included)
and of the worker (Celery's included) is one JSON object; a generation's life is one line
per step, with its request id; no message text, answer text or secret ever reaches a log."""

from __future__ import annotations

import json
import logging
import time
import uuid

import httpx
import pytest

from tests.helpers import new_conversation, read_events, send, text
from tests.stack import Proc, start_web, start_worker
from tidechat import lifecycle, logs

STEPS = [lifecycle.QUEUED, lifecycle.STARTED, lifecycle.FIRST_TOKEN, lifecycle.FINISHED]


@pytest.fixture(scope="module")
def json_stack(process_env, workdir):
    """A web process and a worker of their own, logging JSON (access lines included)."""
    env = {
        **process_env,
        "LOG_FORMAT": "json",
        "ACCESS_LOG": "-",
        "TIDECHAT_CELERY_QUEUE": f"logs-{uuid.uuid4().hex[:8]}",
    }
    worker = start_worker(env, workdir, "worker-json-logs")
    web = start_web(env, workdir, "web-json-logs")
    yield web, worker
    web.stop()
    worker.stop()


def json_lines(proc: Proc) -> list[dict]:
    """Every line of a process's log, each of which must be one JSON object."""
    out = []
    for n, line in enumerate(proc.output().splitlines(), 1):
        try:
            parsed = json.loads(line)
        except ValueError:
            pytest.fail(f"{proc.name}.log line {n} is not JSON: {line!r}")
        assert isinstance(parsed, dict), f"{proc.name}.log line {n} is not an object: {line!r}"
        out.append(parsed)
    return out


def steps_of(lines: list[dict], gid: str) -> list[dict]:
    return [x for x in lines if x.get("generation_id") == gid and x.get("event") in STEPS]


@pytest.mark.e2e
def test_a_generation_is_one_json_line_per_step_and_no_text_is_logged(
    json_stack, model_server, process_env
):
    web, worker = json_stack
    secret = uuid.uuid4().hex
    question = f"What is the launch code {secret}-question?"
    chunks = ["The code ", "is ", f"{secret}-answer", "."]
    model = model_server.script(chunks=chunks)
    rid = f"router-{uuid.uuid4()}"
    with httpx.Client(base_url=web.url, timeout=30) as http:
        cid = new_conversation(http)
        sent = http.post(
            f"/api/conversations/{cid}/messages",
            json={"content": question, "model": model},
            headers={"X-Request-ID": rid},
        )
        assert sent.status_code == 202, sent.text
        assert sent.headers["X-Request-ID"] == rid  # the router's id, echoed
        gen = sent.json()["generation"]
        gid = gen["id"]
        events = read_events(http, gen["events_url"])
        assert text(events) == "".join(chunks)
        other = http.get("/api/conversations")  # no id from a router: a new one
        assert other.headers["X-Request-ID"] not in ("", rid)
        cookies = [c.value for c in http.cookies.jar]
    assert cookies, "the guest session cookie"

    def task_done() -> bool:  # the worker's last line for it: Celery's "succeeded"
        return any(
            x["logger"] == "celery.app.trace" and x.get("generation_id") == gid
            for x in json_lines(worker)
        )

    def other_logged() -> bool:  # gunicorn logs a request after its response is sent
        return any(x.get("request_id") == other.headers["X-Request-ID"] for x in json_lines(web))

    deadline = time.monotonic() + 10  # the stream ends a moment before the task does
    while not (task_done() and other_logged()) and time.monotonic() < deadline:
        time.sleep(0.05)
    web_lines, worker_lines = json_lines(web), json_lines(worker)

    # One line per lifecycle step, in order: queued on the web, the rest in the worker.
    steps = steps_of(web_lines, gid) + steps_of(worker_lines, gid)
    assert [s["event"] for s in steps] == STEPS, steps
    queued, started, first, finished = steps
    assert queued["proc"] == "web" and queued["model"] == model
    assert {started["proc"], first["proc"], finished["proc"]} == {"worker"}
    # The router's request id: on the web's line, and carried to the worker with the task.
    assert {s["request_id"] for s in steps} == {rid}
    assert started["handed_on"] is False
    assert 0 <= first["ms"] <= finished["duration_ms"]
    assert finished["status"] == "done" and finished["error_code"] is None
    assert finished["tokens"] == 3  # the scripted server's usage.completion_tokens

    # Every line has the common fields; gunicorn's and Celery's own lines are JSON too.
    for line in web_lines + worker_lines:
        assert {"time", "level", "logger", "message", "proc", "pid"} <= line.keys(), line
    assert any(x["logger"] == "gunicorn.error" for x in web_lines)
    access = [x for x in web_lines if x["logger"] == "gunicorn.access" and x.get("method")]
    post = [x for x in access if x["method"] == "POST" and x["path"].endswith("/messages")]
    assert [(x["status"], x["request_id"]) for x in post] == [(202, rid)]
    assert any(" ready." in x["message"] for x in worker_lines if x["logger"].startswith("celery"))
    assert task_done()  # Celery's "succeeded" line, with the generation's id
    # The other request's lines have their own id.
    assert any(x.get("request_id") == other.headers["X-Request-ID"] for x in access)

    # No text the user typed or the model wrote, no key, no cookie: anywhere, in any form.
    logged = web.output() + worker.output()
    assert secret not in logged
    assert "launch code" not in logged and "The code" not in logged
    assert process_env["OPENAI_API_KEY"] not in logged
    for value in cookies:
        assert value not in logged


@pytest.mark.e2e
def test_a_failed_generation_finishes_with_its_error_code(json_stack, model_server):
    web, worker = json_stack
    model = model_server.script(status=400)  # the model server refuses the request
    with httpx.Client(base_url=web.url, timeout=30) as http:
        gen = send(http, new_conversation(http), "hello", model)
        events = read_events(http, gen["events_url"])
    code = events[-1].data["code"]
    assert events[-1].event == "error" and code
    deadline = time.monotonic() + 10
    while not (ended := steps_of(json_lines(worker), gen["id"])[1:]):
        assert time.monotonic() < deadline, "no finished line"
        time.sleep(0.05)
    (finished,) = ended  # started, then finished: no first token
    assert finished["event"] == lifecycle.FINISHED and finished["level"] == "WARNING"
    assert (finished["status"], finished["error_code"]) == ("error", code)
    assert finished["tokens"] is None and finished["duration_ms"] >= 0


@pytest.mark.e2e
def test_lines_stay_json_through_a_shutdown(json_stack):
    """Celery writes its shutdown notices from a signal handler, as plain text of its own."""
    web, worker = json_stack
    worker.stop()
    web.stop()
    worker_lines, web_lines = json_lines(worker), json_lines(web)
    assert any("Warm shutdown" in x["message"] for x in worker_lines)
    assert any("Shutting down: Master" in x["message"] for x in web_lines)


# --- the pieces, in process ------------------------------------------------------------------


def test_access_lines_keep_only_a_few_facts_never_headers():
    """gunicorn hands its access logger every request header and environ variable."""
    atoms = {
        "m": "POST", "U": "/api/x", "s": "202", "B": 12, "D": 1500, "q": "",
        "{cookie}i": "session=SECRET-COOKIE", "{authorization}i": "Bearer SECRET-KEY",
        "{x-request-id}o": "abc-123", "{openai_api_key}e": "SECRET-ENV",
    }  # fmt: skip
    record = logging.LogRecord(
        "gunicorn.access", logging.INFO, __file__, 1, "%(m)s %(U)s %(s)s", (atoms,), None
    )
    line = json.loads(logs.JsonFormatter("web").format(record))
    assert line["message"] == "POST /api/x 202"
    assert (line["method"], line["path"], line["status"], line["bytes"]) == (
        "POST",
        "/api/x",
        202,
        12,
    )
    assert line["duration_ms"] == 1.5 and line["request_id"] == "abc-123"
    assert "SECRET" not in json.dumps(line)


def test_extra_fields_are_kept_only_when_scalar():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "a\nb", None, None)
    record.event, record.data = "generation.queued", {"args": ["some prompt"]}
    out = logs.JsonFormatter().format(record)
    assert "\n" not in out  # one line, whatever the message holds
    line = json.loads(out)
    assert line["message"] == "a\nb" and line["event"] == "generation.queued"
    assert "data" not in line


def test_request_ids_are_echoed_and_odd_ones_replaced(app):
    client = app.test_client()

    def request_id(sent: str | None = None) -> str:
        headers = {"X-Request-ID": sent} if sent is not None else {}
        before = (logs.REQUEST_ID.get(), logs.GENERATION_ID.get())
        with client.get("/api/conversations", headers=headers) as response:  # closed after
            (echoed,) = response.headers.getlist("X-Request-ID")
        # as a server closes the body, the ids are unbound: the next line has what it had
        # before (an earlier test in this process may have left one of its own)
        assert (logs.REQUEST_ID.get(), logs.GENERATION_ID.get()) == before
        return echoed

    assert request_id("req-42") == "req-42"
    assert len(request_id()) == 32
    assert len(request_id('a b "quoted" {}')) == 32
    assert len(request_id("x" * 201)) == 32


def test_log_format_is_text_unless_asked():
    assert logs.log_format({}) == "text"
    assert logs.log_format({"LOG_FORMAT": "JSON"}) == "json"
    assert logs.log_format({"LOG_FORMAT": "json", "TIDECHAT_LOG_FORMAT": "text"}) == "text"
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        logs.log_format({"LOG_FORMAT": "xml"})
