"""Writes every running generation's deltas to its Redis Stream, batched per process.

A task hands each delta to the writer and goes back to reading the model. One writer
greenlet per worker process appends everything that is waiting in one pipelined round
trip, merging a generation's waiting deltas into one entry. Deltas that arrive during a
round trip share the next one, so Redis commands and SSE events per token fall as load
rises.

Group commit, as PostgreSQL's ``commit_delay`` waits only while enough other transactions
are active: when deltas arrive so fast that two or more are due within
``STREAM_COALESCE_MS``, the writer waits that long before each batch, so that one round
trip carries many answers' deltas and Redis and the web processes wake once for all of
them. One answer alone, or a few slow ones, is written at once: too little would share the
wait for its latency to buy anything.

Merging only joins adjacent text of one generation, so the concatenation of its deltas,
and so the stored answer, is unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

import redis
from redis.exceptions import NoScriptError

from tidechat import metrics
from tidechat.stream_bus import DELTA, GONE, STOPPED, UNAVAILABLE, StreamBus, dumps

log = logging.getLogger(__name__)

INTERNAL_ERROR = {"code": "internal_error", "message": "This answer could not be stored."}


def refusal(exc: Exception) -> dict[str, str] | None:
    """The error an answer ends with when Redis answered but refused the write, or None
    for a blip worth retrying (no connection, a timeout, still loading its data).

    Full (maxmemory) or a read-only replica is ``unavailable``; Redis 6 reports an OOM
    inside a script as a plain script error, so the text is checked too.
    """
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | NoScriptError):
        return None  # (NoScriptError: a restarted server, its scripts loaded again since)
    text = str(exc)
    if isinstance(exc, redis.exceptions.OutOfMemoryError | redis.exceptions.ReadOnlyError) or (
        "OOM" in text or "READONLY" in text
    ):
        return UNAVAILABLE
    return INTERNAL_ERROR


FAILURE_MEMORY_S = 60.0  # how long a refused append marks the writer unhealthy
GAP_CAP_S = 1.0  # an idle spell counts as this long a gap between deltas
GATHER = 2  # deltas that must be due within a wait for the writer to wait


class Outbox:
    """One generation's deltas on their way to Redis.

    Each batch the writer takes gets the next sequence number of this run (``fence``), and
    a batch is appended at most once however often it is retried, so a retry after a
    partial failure never doubles text. ``written`` is what is in Redis: what clients see.
    """

    __slots__ = ("gid", "fence", "seq", "pending", "written", "stopped", "gone", "failed", "idle")

    def __init__(self, gid: str, fence: int = 0, seq: int = 0) -> None:
        self.gid, self.fence, self.seq = gid, fence, seq
        self.pending: list[str] = []
        self.written: list[str] = []
        self.stopped = False  # ended elsewhere (cancelled before, reaped, handed on) or failed
        self.gone = False  # Redis lost the generation's state
        self.failed: dict[str, str] | None = None  # the error it failed with
        self.idle = threading.Event()
        self.idle.set()

    @property
    def text(self) -> str:
        return "".join(self.written)


class _Batch:
    __slots__ = ("box", "seq", "text", "payload")

    def __init__(self, box: Outbox, seq: int, text: str) -> None:
        self.box, self.seq, self.text = box, seq, text
        self.payload = ""


class HeldConnection:
    """The writer's own connection to one Redis server, taken from its client's pool once
    and kept, and the pipelines it runs there.

    redis-py's pipeline takes a connection from the pool for every execute, first checks
    it for unread data (a non-blocking read, a system call), and wraps the round trip in
    its retry: for one answer alone, 12 % of the worker's CPU per token went to that
    (docs/benchmarks.md, 2026-12-06 fifth session). A pipeline here packs its commands
    into one write and reads their replies in order, an error reply in its command's
    place. Any other failure closes the connection (the next pipeline opens it again) and
    is raised: the writer's own retry, which never doubles text, takes it from there.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._conn: Any = None
        self._pid = 0

    def pipeline(self, transaction: bool = False) -> _HeldPipeline:
        assert not transaction, "a held connection's pipeline is never a transaction"
        return _HeldPipeline(self)

    def run(self, commands: list[tuple]) -> list[Any]:
        if self._conn is None or self._pid != os.getpid():  # (a forked child: its own)
            self._conn, self._pid = self._pool.get_connection(), os.getpid()
        conn = self._conn
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            return [_reply(conn) for _ in commands]
        except BaseException:
            conn.disconnect()  # a reply may be half read: start the next pipeline afresh
            raise


def _reply(conn: Any) -> Any:
    try:
        return conn.read_response()
    except redis.ResponseError as exc:
        return exc


class _HeldPipeline:
    """The commands of one round trip on a :class:`HeldConnection` (those the writer
    sends: the stream bus's ``execute_command`` and the metrics' ``hincrby``)."""

    def __init__(self, held: HeldConnection) -> None:
        self._held = held
        self._commands: list[tuple] = []

    def __enter__(self) -> _HeldPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self._commands = []

    def execute_command(self, *args: Any) -> None:
        self._commands.append(args)

    def hincrby(self, name: str, key: str, amount: int = 1) -> None:
        self.execute_command("HINCRBY", name, key, amount)

    def execute(self, raise_on_error: bool = False) -> list[Any]:
        assert not raise_on_error, "the writer reads each reply, errors included"
        commands, self._commands = self._commands, []
        return self._held.run(commands) if commands else []


class StreamWriter:
    def __init__(
        self, bus: StreamBus, coalesce_ms: float = 0.0, retry_seconds: float = 30.0
    ) -> None:
        self.bus = bus
        self.coalesce = coalesce_ms / 1000
        self.retry_seconds = retry_seconds
        self.gap = GAP_CAP_S  # the mean time between deltas (moving, as TCP's smoothed RTT)
        self._last_put = 0.0
        self._waiting: dict[str, Outbox] = {}
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # On one server its appends go through a connection of its own (on a cluster,
        # through a pipeline per node: bus.by_node).
        self._held = None if bus.keys.clustered else HeldConnection(bus.redis)
        self.last_written: float | None = None  # monotonic times of the last append...
        self.last_failed: float | None = None  # ...and of the last one Redis refused for good

    @property
    def healthy(self) -> bool:
        """Its thread runs, and its last appends did not fail (a failure counts for a
        minute, or until an append succeeds after it)."""
        if self._thread is not None and not self._thread.is_alive():
            return False
        failed = self.last_failed
        if failed is None or time.monotonic() - failed > FAILURE_MEMORY_S:
            return True
        return self.last_written is not None and self.last_written > failed

    def put(self, outbox: Outbox, text: str) -> bool:
        """Queue a delta; False once the generation is no longer this worker's to write."""
        if outbox.stopped:
            return False
        with self._lock:
            outbox.pending.append(text)
            now = time.monotonic()
            self.gap += (min(now - self._last_put, GAP_CAP_S) - self.gap) / 8
            self._last_put = now
            outbox.idle.clear()
            self._waiting[outbox.gid] = outbox
            self._ensure_started()
        self._ready.set()
        return True

    def drain(self, outbox: Outbox, timeout: float | None = None) -> bool:
        """Wait until every queued delta of this generation is in Redis (before its end)."""
        timeout = self.retry_seconds + 30 if timeout is None else timeout
        return outbox.idle.wait(timeout) and not outbox.stopped

    def _ensure_started(self) -> None:
        # Thread.is_alive() for every delta is not only a check. Under gevent its lock
        # acquire yields to the hub, and here it does so with self._lock held: that is what
        # lets the deltas of many answers share one append. A flag instead, with or without
        # a yield outside the lock, cost every process 30-100 % more CPU at 1000 streams
        # (more appends, more events; docs/benchmarks.md, 2026-12-06 third session).
        if self._thread is None or not self._thread.is_alive():  # (re)start: never stay dead
            self._thread = threading.Thread(target=self._run, name="stream-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self._ready.wait()
            if self.coalesce and self.gap * GATHER <= self.coalesce:  # enough are due: gather
                time.sleep(self.coalesce)
            batches = self._take()
            try:
                self._write(batches)
            except Exception:  # fail these generations, never the writer: every answer of
                log.exception("stream writer: %d generations failed", len(batches))  # the
                for batch in batches:  # process goes through it
                    self._fail(batch.box, INTERNAL_ERROR)

    def _take(self) -> list[_Batch]:
        with self._lock:
            self._ready.clear()
            waiting, self._waiting = self._waiting, {}
            batches = []
            for box in waiting.values():
                if box.stopped:  # failed or ended: what is still queued is never written
                    box.pending = []
                    box.idle.set()
                    continue
                box.seq += 1
                batches.append(_Batch(box, box.seq, "".join(box.pending)))
                box.pending = []
        return batches

    def _fail(self, box: Outbox, error: dict[str, str]) -> None:
        box.failed = box.failed or error
        box.stopped = True
        with self._lock:
            box.idle.set()

    def _done(self, box: Outbox) -> None:
        with self._lock:
            if not box.pending:
                box.idle.set()

    def _write(self, batches: list[_Batch]) -> None:
        todo = []
        for batch in batches:
            try:
                batch.payload = dumps({"text": batch.text})
                todo.append(batch)
            except Exception:  # one generation's bad text must not fail the others
                log.exception("generation %s: its text cannot be encoded", batch.box.gid)
                self._fail(batch.box, INTERNAL_ERROR)
        deadline, pause = time.monotonic() + self.retry_seconds, 0.1
        while todo:
            todo = self._attempt(todo, final=time.monotonic() >= deadline)
            if todo:
                time.sleep(pause)
                pause = min(pause * 2, 2.0)

    def _append_on(self, client: Any, batches: list[_Batch], count: bool = True) -> list[Any]:
        """Append these batches on one server in one round trip: each one's reply (its
        last id, STOPPED, GONE, or the exception)."""
        conn = self._held if client is self.bus.redis and self._held else client
        try:
            with conn.pipeline(transaction=False) as pipe:
                for b in batches:
                    self.bus.append(b.box.gid, b.box.fence, b.seq, [(DELTA, b.payload)], pipe)
                if count and client is self.bus.redis:  # one server: the count rides along
                    chars = sum(len(b.text) for b in batches)
                    metrics.count(pipe, self.bus.keys, "chars_relayed", amount=chars)
                return pipe.execute(raise_on_error=False)[: len(batches)]
        except redis.RedisError as exc:
            self.bus.refresh_nodes()
            return [exc] * len(batches)

    def _attempt(self, batches: list[_Batch], final: bool) -> list[_Batch]:
        """One pipelined try per Redis server; returns the batches to try again."""
        replies: list[Any] = [None] * len(batches)
        written = 0
        for client, indexes in self.bus.by_node([b.box.gid for b in batches]):
            group = [batches[i] for i in indexes]
            got = self._append_on(client, group)
            if any(isinstance(reply, NoScriptError) for reply in got):
                with contextlib.suppress(redis.RedisError):  # (restarted: run them again)
                    self.bus.load_scripts(client)
                    got = self._append_on(client, group, count=False)
            for i, reply in zip(indexes, got, strict=True):
                replies[i] = reply
                if client is not self.bus.redis and not isinstance(reply, Exception):
                    written += len(batches[i].text)
        if written:  # a cluster: the app-wide count lives on another node
            with contextlib.suppress(redis.RedisError):
                metrics.count(self.bus.redis, self.bus.keys, "chars_relayed", amount=written)
        retry = []
        for batch, reply in zip(batches, replies, strict=True):
            box = batch.box
            if isinstance(reply, Exception):
                refused = refusal(reply)
                if final or refused:
                    log.error("generation %s: Redis refused its text: %s", box.gid, reply)
                    self.last_failed = time.monotonic()
                    self._fail(box, refused or UNAVAILABLE)
                else:
                    log.warning("generation %s: appending failed (%s); retrying", box.gid, reply)
                    retry.append(batch)
                continue
            reply = reply.decode() if isinstance(reply, bytes) else reply
            if reply == GONE:
                box.gone = box.stopped = True
            elif reply == STOPPED:
                box.stopped = True
            else:
                box.written.append(batch.text)
            self.last_written = time.monotonic()
            self._done(box)
        return retry
