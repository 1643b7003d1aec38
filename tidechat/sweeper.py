"""The sweeper: every unfinished answer in the database ends, watched or not.

Readers end the generations they watch (the hub); the sweeper covers the rest, so that no
chat stays stuck behind an answer nobody will finish. It runs in every web and worker
process, and one of them at a time does the work (a lock in Redis that expires if its
holder dies). Each ``SWEEP_INTERVAL`` it reads the unfinished answers and, for each:
- Redis ended it, the database missed it (down at the time): store the end from the stream;
- running without a lease (its worker died): end it, ``worker_lost``;
- queued for longer than ``QUEUE_TIMEOUT`` (no task anywhere): ``queue_timeout``;
- Redis has no state for it (restarted empty, flushed, failed over): ``state_lost``,
  with a fresh terminal entry so the streams still open on it end.
The last two wait for a second sighting ``grace`` later (see ``recovery``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from flask import Flask

from tidechat import chat, db, lifecycle, recovery
from tidechat.stream_bus import QUEUE_TIMEOUT, QUEUED, RUNNING, StreamBus

log = logging.getLogger(__name__)

BATCH = 500  # answers looked at per sweep

# KEYS: lock | ARGV: holder, ttl_ms -> 1 if the caller holds the lock (now or already).
_LEAD = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class Sweeper:
    def __init__(self, app: Flask) -> None:
        self.app = app
        cfg = app.config
        self.bus: StreamBus = app.extensions["stream_bus"]
        self.interval = float(cfg["SWEEP_INTERVAL"])
        self.queue_timeout = float(cfg["QUEUE_TIMEOUT"])
        grace = 2 * float(cfg["LEASE_TTL"])
        self.unleased = recovery.Sightings(grace)
        self.stateless = recovery.Sightings(max(grace, self.interval))
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._lock_key = app.extensions["redis_keys"].sweeper_lock()
        self._lead = self.bus.redis.register_script(_LEAD)
        self._thread: threading.Thread | None = None

    def start(self) -> Sweeper:
        self._thread = threading.Thread(target=self._run, name="tidechat-sweeper", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                if self._leading():
                    with self.app.app_context():
                        self.sweep()
            except Exception as exc:  # Redis or the database down: try again next time
                log.warning("sweep failed: %s", exc)

    def _leading(self) -> bool:
        ttl_ms = int(self.interval * 3000)
        return bool(self._lead(keys=[self._lock_key], args=[self.holder, ttl_ms]))

    def sweep(self) -> None:
        s = db.session()
        try:
            msgs = chat.unfinished(s, BATCH)
            s.commit()
            states = self.bus.states([m.generation_id for m in msgs]) if msgs else []
            now = time.monotonic()
            for msg, (meta, leased) in zip(msgs, states, strict=True):
                self._settle(s, msg, meta, leased, now)
            seen = {m.generation_id for m in msgs}
            self.unleased.keep(seen)
            self.stateless.keep(seen)
        finally:
            s.close()

    def _settle(self, s, msg, meta: dict[str, str], leased: bool, now: float) -> None:
        gid = msg.generation_id
        state = meta.get("state")
        if state is None:
            if self.stateless.due(gid, now):
                recovery.end_lost(s, self.bus, msg)
            return
        self.stateless.clear(gid)
        if state == RUNNING and not leased:
            if self.unleased.due(gid, now):
                recovery.reap(s, self.bus, gid)
            return
        self.unleased.clear(gid)
        if state == QUEUED:
            waited = time.time() - int(meta.get("queued_at") or 0) / 1000
            if waited > self.queue_timeout and self.bus.fail_queued(gid, QUEUE_TIMEOUT):
                log.warning("generation %s: queued %.0f s with no worker; ended", gid, waited)
                lifecycle.finished(gid, status="error", error_code=QUEUE_TIMEOUT["code"])
                chat.reconcile(s, self.bus, msg)
        elif state != RUNNING:
            chat.reconcile(s, self.bus, msg)  # ended in Redis, not yet in the database


_started: dict[int, Sweeper] = {}


def start(app: Flask) -> None:
    """Start this process's sweeper (once per app)."""
    if id(app) not in _started and float(app.config["SWEEP_INTERVAL"]) > 0:
        _started[id(app)] = Sweeper(app).start()
