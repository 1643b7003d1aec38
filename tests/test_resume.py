"""Exact resume: from any cursor, a client gets exactly the events after it."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest
from httpx_sse import connect_sse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import kinds, read_events, start, text
from tests.stack import start_web

pytestmark = pytest.mark.e2e

CHUNKS = [f"w{i} " for i in range(12)]


@pytest.fixture
def finished(http, model_server):
    model = model_server.script(chunks=CHUNKS, delay=0.01)
    _, gen = start(http, model)
    events = read_events(http, gen["events_url"])
    assert len(events) >= 3  # some deltas (the worker may merge ones that arrive together)
    return gen, events


def test_resume_from_every_cursor_of_a_finished_stream(http, finished):
    gen, full = finished
    for k, event in enumerate(full[:-1]):
        rest = read_events(http, gen["events_url"], cursor=event.id)
        assert rest == full[k + 1 :], f"resume after event {k}"


def test_after_query_parameter_resumes_like_last_event_id(http, finished):
    gen, full = finished
    mid = len(full) // 2
    assert (
        read_events(http, gen["events_url"], cursor=full[mid].id, header=False) == full[mid + 1 :]
    )


def test_last_event_id_header_wins_over_after(http, finished):
    gen, full = finished
    url = f"{gen['events_url']}?after={full[0].id}"
    assert read_events(http, url, cursor=full[-2].id) == full[-1:]


def test_cursor_at_or_past_the_end_gets_204(http, finished):
    gen, full = finished
    for cursor in (full[-1].id, "99999999999999-0"):
        response = http.get(gen["events_url"], headers={"Last-Event-ID": cursor})
        assert response.status_code == 204
        assert response.content == b""


def test_cursor_zero_replays_everything(http, finished):
    gen, full = finished
    assert read_events(http, gen["events_url"], cursor="0") == full


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(k=st.integers(min_value=1, max_value=len(CHUNKS) - 1))
def test_resume_mid_stream_of_a_running_generation(http, model_server, k):
    model = model_server.script(chunks=CHUNKS, delay=0.04)
    _, gen = start(http, model)
    head = read_events(http, gen["events_url"], limit=k)
    assert len(head) == k
    tail = read_events(http, gen["events_url"], cursor=head[-1].id)
    whole = head + tail
    assert text(whole) == "".join(CHUNKS)
    assert kinds(whole) == ["delta", "done"]
    assert len({e.id for e in whole}) == len(whole)


def test_resume_on_another_web_process(http, model_server, process_env, workdir):
    """A reconnect may land on a different web process: the cursor is all it needs."""
    other = start_web(process_env, workdir, name="web-second")
    try:
        model = model_server.script(chunks=CHUNKS, delay=0.04)
        _, gen = start(http, model)
        head = read_events(http, gen["events_url"], limit=5)
        tail = read_events(http, other.url + gen["events_url"], cursor=head[-1].id)
        assert text(head + tail) == "".join(CHUNKS)
        assert tail[-1].event == "done"
    finally:
        other.stop()


def test_cursor_ahead_of_a_running_stream_still_closes(http, model_server):
    """A made-up cursor beyond the end of a live stream ends with the stream, not never."""
    model = model_server.script(chunks=["a", "b", "c"], delay=0.3)
    _, gen = start(http, model)
    events = read_events(http, gen["events_url"], cursor="99999999999999-0", timeout=20)
    assert events == []
    response = http.get(gen["events_url"], headers={"Last-Event-ID": "99999999999999-0"})
    assert response.status_code == 204


def test_sigterm_ends_open_streams_at_once_and_resume_elsewhere_is_exact(
    http, model_server, process_env, workdir
):
    """A deploy: the web process a client streams from gets SIGTERM. Its streams must end
    at once (not at gunicorn's 10 s graceful timeout) with a short retry hint, and the client
    resumes on another process with exactly the rest."""
    leaving = start_web(process_env, workdir, name="web-leaving")
    chunks = [f"s{i} " for i in range(40)]
    model = model_server.script(chunks=chunks, delay=0.1)
    _, gen = start(http, model)
    url = leaving.url + gen["events_url"]
    seen, ids, retry_hints = [], [], []
    try:
        with httpx.Client(cookies=http.cookies, timeout=30) as client:
            with connect_sse(client, "GET", url) as source:
                for sse in source.iter_sse():
                    if sse.retry is not None:
                        retry_hints.append(sse.retry)
                    if sse.event == "delta":
                        seen.append(json.loads(sse.data)["text"])
                        ids.append(sse.id)
                        if len(ids) == 5:
                            leaving.popen.send_signal(signal.SIGTERM)
                            signalled = time.monotonic()
                    assert sse.event not in ("done", "error"), "the stream should have been cut"
            ended_after = time.monotonic() - signalled
    finally:
        leaving.stop()
    assert ended_after < 5, f"stream held {ended_after:.1f} s after SIGTERM"
    assert retry_hints[-1] == 250  # reconnect soon: another process is there
    rest = read_events(http, gen["events_url"], cursor=ids[-1])
    assert "".join(seen) + text(rest) == "".join(chunks)
    assert rest[-1].event == "done"
