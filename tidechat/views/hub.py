"""This process's StreamHub, made on first use (after gunicorn forks, never before)."""

from __future__ import annotations

import threading

from flask import Flask, current_app

from tidechat import chat, db, models, recovery
from tidechat.stream_bus import Entry, dumps
from tidechat.stream_hub import StreamHub, make_hub

# The id of an end read from the database while Redis is out of reach: past any real id,
# so that a client that reconnects with it is told the stream is over.
SETTLED_ID = f"{2**64 - 1}-0"

_lock = threading.Lock()


def get_hub() -> StreamHub:
    app = current_app._get_current_object()
    hub = app.extensions.get("stream_hub")
    if hub is None:
        with _lock:
            hub = app.extensions.get("stream_hub")
            if hub is None:
                hub = app.extensions["stream_hub"] = _make_hub(app)
    return hub


def drain(app: Flask) -> None:
    """Called at SIGTERM (gunicorn.conf.py): end this process's streams at once (the hub
    is made if it was not, so that a stream asked for after this is ended too)."""
    with app.app_context():
        get_hub().drain()


def _make_hub(app: Flask) -> StreamHub:
    cfg = app.config

    def reap(gid: str) -> bool:
        with app.app_context():
            return recovery.reap(db.session(), app.extensions["stream_bus"], gid)

    def settle(gid: str) -> Entry | None:
        with app.app_context():
            msg = chat.generation_message(db.session(), gid)
            if msg is None or msg.status not in models.FINAL_STATUSES:
                return None
            event, payload = chat.terminal_of(msg)
            # The whole stored text: the client may have missed its last part.
            return Entry(SETTLED_ID, event, dumps({**payload, "text": msg.content or ""}))

    return make_hub(
        cfg["REDIS_URL"],
        app.extensions["redis_keys"],
        int(cfg["STREAM_TTL"]),
        block_ms=int(cfg["HUB_BLOCK_MS"]),
        read_count=int(cfg["HUB_READ_COUNT"]),
        pace_s=float(cfg["HUB_PACE_US"]) / 1e6,
        direct_max=int(cfg["HUB_DIRECT_MAX"]),
        lease_ttl=float(cfg["LEASE_TTL"]),
        reap_interval=float(cfg["REAP_INTERVAL"]),
        reap=reap,
        settle=settle,
    )
