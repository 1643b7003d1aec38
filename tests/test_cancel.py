"""Stop: the answer stops within a second, the model call is closed, the text is kept."""

from __future__ import annotations

import time

import pytest

from tests.helpers import new_conversation, read_events, send, start, text, wait_status
from tests.model_server import Script

pytestmark = pytest.mark.e2e


def test_stop_closes_the_model_stream_and_keeps_partial_text(http, model_server):
    model = model_server.script(chunks=[f"t{i} " for i in range(200)], delay=0.05)
    cid, gen = start(http, model)
    head = read_events(http, gen["events_url"], limit=5)

    asked = time.monotonic()
    response = http.post(gen["cancel_url"])
    assert response.status_code == 202
    hung_up = model_server.wait_for_hangup(model, timeout=5)
    assert hung_up is not None and hung_up - asked < 1.0

    rest = read_events(http, gen["events_url"], cursor=head[-1].id)
    events = head + rest
    assert events[-1].event == "done"
    assert events[-1].data["finish_reason"] == "cancelled"
    partial = text(events)
    assert partial and partial != "".join(f"t{i} " for i in range(200))

    assistant = http.get(f"/api/conversations/{cid}").json()["messages"][-1]
    assert assistant["status"] == "cancelled"
    assert assistant["finish_reason"] == "cancelled"
    assert assistant["content"] == partial


def test_stop_while_the_model_is_silent(http, model_server):
    model = model_server.script(chunks=["a", "b"], first_delay=30)
    _, gen = start(http, model)
    model_server.wait_for_request(model, timeout=10)
    asked = time.monotonic()
    assert http.post(gen["cancel_url"]).status_code == 202
    hung_up = model_server.wait_for_hangup(model, timeout=5)
    assert hung_up is not None and hung_up - asked < 1.0
    events = read_events(http, gen["events_url"])
    assert events == [events[-1]] and events[-1].data["finish_reason"] == "cancelled"


def test_cancel_is_idempotent_and_200_once_finished(http, model_server):
    model = model_server.script(chunks=["done quickly"])
    _, gen = start(http, model)
    read_events(http, gen["events_url"])
    for _ in range(2):
        response = http.post(gen["cancel_url"])
        assert response.status_code == 200
        assert response.json()["status"] == "done"
        assert response.json()["text"] == "done quickly"


def test_closing_every_client_does_not_stop_the_generation(http, model_server):
    chunks = [f"c{i} " for i in range(20)]
    model = model_server.script(chunks=chunks, delay=0.03)
    _, gen = start(http, model)
    read_events(http, gen["events_url"], limit=2)  # then the client goes away
    generation = wait_status(http, gen["id"], {"done", "error", "cancelled"})
    assert generation["status"] == "done"
    assert generation["text"] == "".join(chunks)
    assert model_server.requests_for(model)[-1].hung_up is None


def test_cancel_before_the_worker_starts(http, model_server, worker):
    """A queued generation is ended by the cancel itself; the worker then skips it."""
    import os
    import signal

    model = model_server.script(Script(chunks=["never"]))
    cid = new_conversation(http)
    os.kill(worker.popen.pid, signal.SIGSTOP)  # hold the worker so the task stays queued
    try:
        gen = send(http, cid, "hello", model)
        response = http.post(gen["cancel_url"])
    finally:
        os.kill(worker.popen.pid, signal.SIGCONT)
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    events = read_events(http, gen["events_url"])
    assert [e.event for e in events] == ["done"]
    time.sleep(0.5)
    assert model_server.requests_for(model) == []
