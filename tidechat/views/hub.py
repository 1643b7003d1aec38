"""This process's StreamHub, made on first use (after gunicorn forks, never before)."""

from __future__ import annotations

import threading

from flask import Flask, current_app

from tidechat import db, recovery
from tidechat.stream_hub import StreamHub

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
    """Called at SIGTERM (gunicorn.conf.py): end this process's streams at once."""
    with app.app_context():
        get_hub().drain()


def _make_hub(app: Flask) -> StreamHub:
    cfg = app.config

    def reap(gid: str) -> bool:
        with app.app_context():
            return recovery.reap(db.session(), app.extensions["stream_bus"], gid)

    return StreamHub(
        cfg["REDIS_URL"],
        app.extensions["redis_keys"],
        int(cfg["STREAM_TTL"]),
        block_ms=int(cfg["HUB_BLOCK_MS"]),
        read_count=int(cfg["HUB_READ_COUNT"]),
        lease_ttl=float(cfg["LEASE_TTL"]),
        reap_interval=float(cfg["REAP_INTERVAL"]),
        reap=reap,
    )
