"""End to end: POST → Celery worker → model stream → Redis Stream → SSE, through real processes."""

from __future__ import annotations

import time

import pytest

from tests.helpers import kinds, new_conversation, read_events, send, start, text

pytestmark = pytest.mark.e2e


def test_answer_streams_exactly_and_is_stored(http, model_server):
    chunks = ["The ", "tide ", "comes ", "in", ".\n\n", "Ünïcødé ✓ ", "🌊"]
    model = model_server.script(chunks=chunks, delay=0.01)
    cid, gen = start(http, model, "Tell me about tides")

    events = read_events(http, gen["events_url"])

    assert kinds(events) == ["delta", "done"]
    assert text(events) == "".join(chunks)
    assert events[-1].data == {
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }
    assert len({e.id for e in events}) == len(events)

    conversation = http.get(f"/api/conversations/{cid}").json()
    user, assistant = conversation["messages"]
    assert (user["role"], user["content"], user["status"]) == (
        "user",
        "Tell me about tides",
        "done",
    )
    assert assistant["content"] == "".join(chunks)
    assert assistant["status"] == "done"
    assert assistant["finish_reason"] == "stop"
    assert assistant["generation_id"] == gen["id"]
    assert assistant["usage"]["total_tokens"] == 10
    assert conversation["title"] == "Tell me about tides"

    generation = http.get(f"/api/generations/{gen['id']}").json()
    assert generation["status"] == "done" and generation["text"] == "".join(chunks)


def test_model_sees_the_whole_conversation(http, model_server):
    model = model_server.script(chunks=["first answer"])
    cid = new_conversation(http)
    read_events(http, send(http, cid, "first question", model)["events_url"])
    read_events(http, send(http, cid, "second question", model)["events_url"])

    last = model_server.requests_for(model)[-1].body
    assert last["messages"] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]
    assert last["stream"] is True
    assert last["stream_options"] == {"include_usage": True}


def test_answer_without_usage_is_fine(http, model_server):
    model = model_server.script(chunks=["no usage here"], usage=None)
    _, gen = start(http, model)
    events = read_events(http, gen["events_url"])
    assert events[-1].data == {"finish_reason": "stop", "usage": None}


def test_length_finish_reason_is_reported(http, model_server):
    model = model_server.script(chunks=["cut short"], finish_reason="length")
    _, gen = start(http, model)
    assert read_events(http, gen["events_url"])[-1].data["finish_reason"] == "length"


def test_non_streaming_mode_returns_the_finished_message(http, model_server):
    model = model_server.script(chunks=["all ", "at ", "once"], delay=0.02)
    cid = new_conversation(http)
    response = http.post(
        f"/api/conversations/{cid}/messages",
        json={"content": "no stream please", "model": model, "stream": False},
    )
    assert response.status_code == 200, response.text
    message = response.json()["message"]
    assert message["role"] == "assistant"
    assert message["content"] == "all at once"
    assert message["status"] == "done"
    assert message["finish_reason"] == "stop"


def test_two_clients_on_one_generation_get_identical_events(http, web, model_server):
    import threading

    import httpx

    model = model_server.script(chunks=[f"tok{i} " for i in range(30)], delay=0.03)
    _, gen = start(http, model)
    second = httpx.Client(base_url=web.url, cookies=http.cookies, timeout=30)
    results: dict[str, list] = {}

    def read(name: str, client) -> None:
        results[name] = read_events(client, gen["events_url"])

    threads = [
        threading.Thread(target=read, args=("a", http)),
        threading.Thread(target=read, args=("b", second)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    second.close()
    assert results["a"] == results["b"]
    assert text(results["a"]) == "".join(f"tok{i} " for i in range(30))


def test_sse_headers_and_first_bytes(http, model_server):
    model = model_server.script(chunks=["x"], first_delay=1.5)
    _, gen = start(http, model)
    with http.stream("GET", gen["events_url"]) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache, no-transform"
        assert response.headers["x-accel-buffering"] == "no"
        assert "content-encoding" not in response.headers
        first = next(response.iter_raw())
        assert first.startswith(b"retry: ")


def test_keepalive_is_a_named_event_without_id_while_model_is_silent(http, model_server):
    # Page code sees a named event (a comment is invisible to it) and can tell a stalled
    # connection from a quiet answer; with no id it never moves the client's cursor.
    model = model_server.script(chunks=["late"], first_delay=2.5)
    _, gen = start(http, model)
    seen = b""
    with http.stream("GET", gen["events_url"]) as response:
        for part in response.iter_raw():
            seen += part
            if b"event: done" in seen:
                break
    blocks = seen.split(b"event: delta")[0].split(b"\n\n")
    pings = [b for b in blocks if b"event: ping" in b]
    assert pings[0] == b'event: ping\ndata: {"interval": 1}'  # sent at once, on connect
    assert len(pings) >= 2  # and again while the model is silent (PING_INTERVAL is 1 s)
    assert all(b"id:" not in b for b in pings)


def test_a_burst_of_tiny_chunks_arrives_exactly(http, model_server):
    """Deltas that arrive together may be merged into one event; the text never changes."""
    chunks = [chr(0x41 + i % 26) + ("\n" if i % 37 == 0 else "") for i in range(400)]
    model = model_server.script(chunks=chunks)
    cid, gen = start(http, model)
    events = read_events(http, gen["events_url"])
    assert kinds(events) == ["delta", "done"]
    assert text(events) == "".join(chunks)
    stored = http.get(f"/api/conversations/{cid}").json()["messages"][-1]["content"]
    assert stored == "".join(chunks)


def test_answers_one_after_another_share_one_connection_to_the_model(http, model_server):
    """A model server that keeps its connections (every real one does) is not asked to open
    one per answer: after "[DONE]" the worker reads the body's end, so the connection goes
    back to its pool, and the next answer takes it (no new TCP or TLS handshake)."""
    model = model_server.script(chunks=["Same ", "line."], reuse=True)
    cid = new_conversation(http)
    for question in ("one", "two", "three"):
        events = read_events(http, send(http, cid, question, model)["events_url"])
        assert kinds(events) == ["delta", "done"] and text(events) == "Same line."
    records = model_server.requests_for(model)
    assert len(records) == 3
    assert len({r.client_port for r in records}) == 1, "each answer opened a new connection"


def test_an_answer_after_a_pause_reuses_the_connection_to_the_model(http, model_server):
    """A person's next message usually comes more than 5 s after the last answer (the
    HTTP library's own keep-alive), and must not cost a new TCP and TLS handshake with the
    model server (TIDECHAT_OPENAI_KEEPALIVE, 60 s)."""
    model = model_server.script(chunks=["After ", "a pause."], reuse=True)
    cid = new_conversation(http)
    events = read_events(http, send(http, cid, "one", model)["events_url"])
    assert text(events) == "After a pause."
    time.sleep(6.0)
    events = read_events(http, send(http, cid, "two", model)["events_url"])
    assert kinds(events) == ["delta", "done"] and text(events) == "After a pause."
    first, second = model_server.requests_for(model)
    assert first.client_port == second.client_port, "the answer opened a new connection"


def test_a_model_server_closing_idle_connections_costs_the_next_answer_nothing(
    http, model_server, worker
):
    """A server that closes its idle connections sooner than Tidechat would keep them
    (uvicorn's and llama.cpp's 5 s): the next answer notices, opens a new one and streams
    exactly, with no error and no retry."""
    model = model_server.script(chunks=["Fresh ", "line."], reuse=True)
    cid = new_conversation(http)
    events = read_events(http, send(http, cid, "one", model)["events_url"])
    assert text(events) == "Fresh line."
    assert model_server.close_idle() >= 1
    time.sleep(0.2)  # (the FIN reaches the worker's end)
    logged = len(worker.output())
    events = read_events(http, send(http, cid, "two", model)["events_url"])
    assert kinds(events) == ["delta", "done"] and text(events) == "Fresh line."
    first, second = model_server.requests_for(model)
    assert first.client_port != second.client_port
    assert "Retrying request" not in worker.output()[logged:]  # (the SDK's, at INFO)


def test_a_model_server_slow_to_end_its_body_after_done_does_not_hold_the_answer(
    http, model_server
):
    """The read of the body's end after "[DONE]" is bounded (0.1 s): a server that keeps
    the body open for seconds after it costs the answer nothing, and the next one works."""
    model = model_server.script(chunks=["Done ", "already."], reuse=True, linger=8.0)
    cid = new_conversation(http)
    started = time.monotonic()
    events = read_events(http, send(http, cid, "first", model)["events_url"])
    assert kinds(events) == ["delta", "done"] and text(events) == "Done already."
    assert time.monotonic() - started < 4.0  # not the server's 8 s
    assert model_server.wait_for_hangup(model, timeout=5) is not None  # the worker gave up on it
    events = read_events(http, send(http, cid, "second", model)["events_url"])
    assert text(events) == "Done already."
