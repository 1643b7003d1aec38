"""Small steps every end-to-end test takes: start a chat, send, read the event stream."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import connect_sse


@dataclass
class Event:
    id: str
    event: str
    data: dict[str, Any]


def new_conversation(http: httpx.Client) -> str:
    response = http.post("/api/conversations")
    assert response.status_code == 201, response.text
    return response.json()["id"]


def send(http: httpx.Client, cid: str, content: str, model: str, **extra: Any) -> dict:
    response = http.post(
        f"/api/conversations/{cid}/messages", json={"content": content, "model": model, **extra}
    )
    assert response.status_code == 202, response.text
    return response.json()["generation"]


def start(http: httpx.Client, model: str, content: str = "Hi there") -> tuple[str, dict]:
    cid = new_conversation(http)
    return cid, send(http, cid, content, model)


def read_events(
    http: httpx.Client,
    url: str,
    *,
    cursor: str | None = None,
    header: bool = True,
    limit: int | None = None,
    timeout: float = 30,
) -> list[Event]:
    """Read an SSE stream to its end (or ``limit`` events), like an EventSource would."""
    headers = {"Last-Event-ID": cursor} if cursor is not None and header else {}
    if cursor is not None and not header:
        url = f"{url}?after={cursor}"
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    with connect_sse(http, "GET", url, headers=headers, timeout=timeout) as source:
        source.response.raise_for_status()
        for sse in source.iter_sse():
            if not sse.data or sse.event == "ping":  # the "retry:" hint, keepalives
                continue
            events.append(Event(sse.id, sse.event, json.loads(sse.data)))
            if sse.event in ("done", "error") or (limit and len(events) >= limit):
                break
            assert time.monotonic() < deadline, "stream did not end in time"
    return events


def kinds(events: list[Event]) -> list[str]:
    """The event types, with runs of deltas folded into one (the worker may merge deltas
    that arrive together, so how many there are is not part of the contract)."""
    out: list[str] = []
    for e in events:
        if not (e.event == "delta" and out and out[-1] == "delta"):
            out.append(e.event)
    return out


def text(events: list[Event]) -> str:
    return "".join(e.data["text"] for e in events if e.event == "delta")


def wait_status(http: httpx.Client, gid: str, statuses: set[str], timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        generation = http.get(f"/api/generations/{gid}").json()
        if generation["status"] in statuses or time.monotonic() > deadline:
            return generation
        time.sleep(0.05)


def lock_sqlite(path: str) -> sqlite3.Connection:
    """Take SQLite's write lock on ``path`` from this process (to the app's processes, as
    a backup or a script would); ``rollback()`` gives it back, from any thread."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    return holder


# For a script run in a gevent process: ``busy``, a greenlet body that counts in ``ticks``
# how often the hub lets it run (something that should not wait, measured by it, leaves
# ``ticks`` at 0).
BUSY_GREENLET = """
ticks = 0
def busy():
    global ticks
    while True:
        ticks += 1
        gevent.sleep(0)
"""
