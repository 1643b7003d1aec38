"""Writes every running generation's deltas to its Redis Stream, batched per process.

A task hands each delta to the writer and goes back to reading the model. One writer
greenlet per worker process appends everything that is waiting in one pipelined round
trip, merging a generation's waiting deltas into one entry. When the process is idle a
delta is written at once; under load, deltas that arrive during a round trip share the
next one, so Redis commands and SSE events per token fall as load rises. An optional
``STREAM_COALESCE_MS`` waits that long before each batch to merge more.

Merging only joins adjacent text of one generation, so the concatenation of its deltas,
and so the stored answer, is unchanged.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from tidechat.stream_bus import DELTA, StreamBus, dumps

log = logging.getLogger(__name__)


class Outbox:
    """One generation's deltas on their way to Redis."""

    __slots__ = ("gid", "pending", "stopped", "failed", "idle")

    def __init__(self, gid: str) -> None:
        self.gid = gid
        self.pending: list[str] = []
        self.stopped = False  # the generation was ended elsewhere (cancelled before, reaped)
        self.failed = False  # its deltas could not be written: the generation fails
        self.idle = threading.Event()
        self.idle.set()


class StreamWriter:
    def __init__(self, bus: StreamBus, coalesce_ms: float = 0.0) -> None:
        self.bus = bus
        self.coalesce = coalesce_ms / 1000
        self._waiting: dict[str, Outbox] = {}
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def put(self, outbox: Outbox, text: str) -> bool:
        """Queue a delta; False once the generation is no longer this worker's to write."""
        if outbox.stopped:
            return False
        with self._lock:
            outbox.pending.append(text)
            outbox.idle.clear()
            self._waiting[outbox.gid] = outbox
            self._ensure_started()
        self._ready.set()
        return True

    def drain(self, outbox: Outbox, timeout: float = 30.0) -> bool:
        """Wait until every queued delta of this generation is in Redis (before its end)."""
        return outbox.idle.wait(timeout) and not outbox.stopped

    def _ensure_started(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stream-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self._ready.wait()
            if self.coalesce:
                time.sleep(self.coalesce)
            with self._lock:
                self._ready.clear()
                batch, self._waiting = self._waiting, {}
                texts = {gid: "".join(box.pending) for gid, box in batch.items()}
                for box in batch.values():
                    box.pending = []
            try:
                self._write(batch, texts)
            except Exception:  # fail these generations, never the writer: every answer of
                log.exception("stream writer: %d generations failed", len(batch))  # the
                for box in batch.values():  # process goes through it
                    self._fail(box)

    def _fail(self, box: Outbox) -> None:
        box.failed = box.stopped = True
        with self._lock:
            box.idle.set()

    def _write(self, batch: dict[str, Outbox], texts: dict[str, str]) -> None:
        payloads = {}
        for gid, text in texts.items():
            try:
                payloads[gid] = dumps({"text": text})
            except Exception:  # one generation's bad text must not fail the others
                log.exception("generation %s: its text cannot be encoded", gid)
                self._fail(batch.pop(gid))
        while True:
            try:
                with self.bus.redis.pipeline(transaction=False) as pipe:
                    for gid, payload in payloads.items():
                        self.bus.append(gid, [(DELTA, payload)], pipe)
                    results = pipe.execute()
                break
            except redis.RedisError:
                log.exception("appending %d deltas failed; retrying", len(texts))
                time.sleep(0.2)
        for (_gid, box), last_id in zip(batch.items(), results, strict=True):
            if last_id is None:
                box.stopped = True
            with self._lock:
                if not box.pending:
                    box.idle.set()
