"""Error reports: with SENTRY_DSN set, a request's unhandled exception and a failed Celery
task reach the Sentry server, here a loopback endpoint that records what it is sent, with
no request body, cookie, message text or key in them."""

from __future__ import annotations

import gzip
import json
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from flask import Flask, request

from tests.stack import WebProc, start_web, start_worker
from worker import GENERATE_TASK


class SentrySink:
    """A loopback Sentry: records every envelope POSTed to ``/api/<project>/envelope/``."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding == "br":
                    import brotli  # only if the SDK found it installed

                    body = brotli.decompress(body)
                with sink.lock:
                    sink.bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.server.server_address[1]}/1"

    def raw(self) -> bytes:
        with self.lock:
            return b"\n".join(self.bodies)

    def events(self, kind: str = "event") -> list[dict]:
        with self.lock:
            bodies = list(self.bodies)
        return [item for body in bodies for k, item in envelope_items(body) if k == kind]

    def wait_for(
        self, match: Callable[[dict], bool], timeout: float = 20, kind: str = "event"
    ) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events(kind) if match(e)]
            if found:
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no such {kind}; received: {self.events(kind)}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def envelope_items(body: bytes) -> Iterator[tuple[str, Any]]:
    """An envelope: a header line, then items, each a header line and a payload (``length``
    bytes if the header says, else one line)."""
    _, _, rest = body.partition(b"\n")
    while rest.strip():
        head, _, rest = rest.partition(b"\n")
        header = json.loads(head)
        if "length" in header:
            payload, rest = rest[: header["length"]], rest[header["length"] :]
            rest = rest.removeprefix(b"\n")
        else:
            payload, _, rest = rest.partition(b"\n")
        try:
            yield header.get("type", ""), json.loads(payload)
        except ValueError:
            yield header.get("type", ""), payload


@pytest.fixture(scope="module")
def sentry() -> Iterator[SentrySink]:
    sink = SentrySink()
    yield sink
    sink.close()


@pytest.fixture(scope="module")
def reporting_env(process_env: dict[str, str], sentry: SentrySink) -> dict[str, str]:
    return {
        **process_env,
        "SENTRY_DSN": sentry.dsn,
        "SENTRY_ENVIRONMENT": "tests",
        "SENTRY_RELEASE": "tidechat@test",
        "LOG_FORMAT": "json",
        "TIDECHAT_CELERY_QUEUE": f"sentry-{uuid.uuid4().hex[:8]}",
    }


# --- an unhandled exception in a request ------------------------------------------------------


class FaultForTests(Exception):
    """What a bug in a view raises: nothing in the app handles it."""


def app_with_a_fault() -> Flask:
    """The real app, plus one route of this test's own that fails like a bug would (gunicorn
    loads this factory: ``tests.test_sentry:app_with_a_fault()``)."""
    from app import create_app

    app = create_app()

    @app.post("/api/test-only/fault")
    def fault():
        request.get_json()  # the body was read: it must not be reported all the same
        raise FaultForTests("a bug in a view")

    return app


def start_faulty_web(env: dict[str, str], logdir) -> WebProc:
    """A real gunicorn+gevent web process with the factory above and the real
    gunicorn.conf.py (which starts error reporting in each worker)."""
    return start_web(env, logdir, "web-sentry", app=f"{__name__}:app_with_a_fault()")


@pytest.mark.e2e
def test_an_unhandled_request_exception_is_reported_without_body_or_cookie(
    reporting_env, workdir, sentry
):
    web = start_faulty_web(reporting_env, workdir)
    secret = uuid.uuid4().hex
    rid = f"router-{uuid.uuid4()}"
    try:
        with httpx.Client(base_url=web.url, timeout=30) as http:
            assert http.post("/api/conversations").status_code == 201  # a guest's cookie
            cookies = [c.value for c in http.cookies.jar]
            failed = http.post(
                "/api/test-only/fault",
                json={"content": f"my private question {secret}"},
                headers={"X-Request-ID": rid},
            )
        assert failed.status_code == 500 and failed.headers["X-Request-ID"] == rid
        event = sentry.wait_for(lambda e: exception_type(e) == "FaultForTests")
    finally:
        web.stop()

    assert event["tags"]["request_id"] == rid and event["tags"]["proc"] == "web"
    assert event["environment"] == "tests" and event["release"] == "tidechat@test"
    assert event["transaction"] == "/api/test-only/fault"
    req = event["request"]
    assert req["method"] == "POST" and req["url"].endswith("/api/test-only/fault")
    assert not req.get("data") and "cookies" not in req  # the body: "removed by config"
    sensitive = {
        k: v for k, v in req["headers"].items() if k.lower() in ("cookie", "authorization")
    }
    assert set(sensitive.values()) <= {"[Filtered]"}
    assert "user" not in event or "ip_address" not in event["user"]
    frames = event["exception"]["values"][-1]["stacktrace"]["frames"]
    assert frames and not any("vars" in f for f in frames)  # no local variables

    sent = sentry.raw().decode(errors="replace")
    assert cookies and cookies[0]
    for value in (secret, *cookies, reporting_env["OPENAI_API_KEY"], reporting_env["SECRET_KEY"]):
        assert value not in sent
    # The same failure in the logs: one JSON line, with its request id and exception.
    lines = [json.loads(line) for line in web.output().splitlines()]
    logged = [x for x in lines if x.get("exc_type") == "FaultForTests"]
    assert [x["request_id"] for x in logged] == [rid]
    assert secret not in web.output()


# --- a failed task ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_failed_task_is_reported(reporting_env, workdir, sentry, make_app):
    """A task the worker cannot run (here a message without its argument, as a web process
    of an incompatible version could queue) fails in Celery: that is reported."""
    worker = start_worker(reporting_env, workdir, "worker-sentry")
    try:
        queue = reporting_env["TIDECHAT_CELERY_QUEUE"]
        publisher = make_app(TIDECHAT_CELERY_QUEUE=queue).extensions["celery"]
        publisher.send_task(GENERATE_TASK, args=[], headers={"tidechat_request_id": "req-task"})
        event = sentry.wait_for(
            lambda e: exception_type(e) == "TypeError" and e["tags"].get("proc") == "worker"
        )
    finally:
        worker.stop()
    assert event["extra"]["celery-job"]["task_name"] == GENERATE_TASK
    assert event["tags"]["request_id"] == "req-task"  # the request that queued it
    assert "generate()" in event["exception"]["values"][-1]["value"]
    lines = [json.loads(line) for line in worker.output().splitlines()]
    assert any(x.get("exc_type") == "TypeError" for x in lines)


def exception_type(event: dict) -> str | None:
    values = (event.get("exception") or {}).get("values") or []
    return values[-1].get("type") if values else None


# --- one trace from the request to its task ---------------------------------------------------


@pytest.mark.e2e
def test_a_message_and_the_task_that_answers_it_are_one_trace(reporting_env, workdir, sentry):
    """With tracing on, the worker's transaction for an answer continues the trace of the
    POST that queued it (before: the web's own enqueue carried no trace, so each answer
    started a trace of its own)."""
    env = {
        **reporting_env,
        "SENTRY_TRACES_SAMPLE_RATE": "1",
        "TIDECHAT_CELERY_QUEUE": f"sentry-trace-{uuid.uuid4().hex[:8]}",
    }
    worker = start_worker(env, workdir, "worker-sentry-trace")
    web = start_web(env, workdir, "web-sentry-trace")
    try:
        with httpx.Client(base_url=web.url, timeout=30) as http:
            cid = http.post("/api/conversations").json()["id"]
            posted = http.post(f"/api/conversations/{cid}/messages", json={"content": "hi"})
            assert posted.status_code == 202
        task = sentry.wait_for(lambda e: e.get("transaction") == GENERATE_TASK, kind="transaction")
        request = sentry.wait_for(
            lambda e: (e.get("transaction") or "").endswith("/messages"), kind="transaction"
        )
    finally:
        web.stop()
        worker.stop()
    trace = request["contexts"]["trace"]
    assert task["contexts"]["trace"]["trace_id"] == trace["trace_id"]
    assert task["contexts"]["trace"]["parent_span_id"] is not None
