"""The web process's side of the stream bus: one reader fans every stream out to clients.

Each web process holds the same few Redis connections for all its SSE clients, however many:
- the reader, which alone runs one multi-key ``XREAD BLOCK`` over every stream some client
  is watching (and the occasional XRANGE backfill and reap check; the pipelines that admit
  new clients take a second connection from the reader's pool, since redis-py runs a
  pipeline on a pool connection even for a single-connection client). Past
  ``direct_max`` streams it blocks on the bucket's moved stream instead, where every
  append names its stream, and reads only the streams that moved: an XREAD costs Redis in
  proportion to the streams it names;
- the waker, which appends to this process's own wake stream so that the reader's blocking
  XREAD returns at once when a client subscribes.

A subscription starts at a cursor (a stream id, "0" for the start). The reader replays what
the subscriber missed, then tails; each subscriber keeps its own cursor and drops anything at
or before it, so replay and tail meet with no gap and no duplicate.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from tidechat import redis_conn
from tidechat.recovery import Sightings
from tidechat.redis_keys import RedisKeys
from tidechat.sse import ServerSentEvent
from tidechat.stream_bus import RUNNING, WORKER_LOST, Entry, StreamBus, id_tuple, parse_entry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Frame:
    """One stream entry, encoded for the wire once and shared by every subscriber (the
    entry itself too, for doors that speak another wire format: /v1)."""

    id: tuple[int, int]
    wire: bytes
    terminal: bool
    entry: Entry


def encode_entry(entry: Entry) -> Frame:
    wire = ServerSentEvent(id=entry.id, event=entry.event, data=entry.data).encode()
    return Frame(id_tuple(entry.id), wire, entry.terminal, entry)


class Subscription:
    """One client's view of one generation's stream."""

    __slots__ = (
        "gid", "cursor", "status", "await_stream", "_hub", "_frames", "_lock", "_ready",
        "_wakeup",
    )  # fmt: skip

    def __init__(self, hub: StreamHub, gid: str, cursor: str, await_stream: bool) -> None:
        self.gid = gid
        self.cursor = id_tuple(cursor)
        # With no stream in Redis: wait for one (the answer is not over, and whoever ends
        # it writes a terminal event), rather than "missing".
        self.await_stream = await_stream
        # then "live", "finished" (cursor at/after the end) or "missing"; "ended" once the
        # terminal event is delivered; "drained" if this process stops first
        self.status = "pending"
        self._hub = hub
        self._frames: list[Frame] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._wakeup = threading.Event()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def get(self, timeout: float) -> tuple[bytes, bool] | None:
        """Wait for events: (wire bytes of every pending event, reached the end), or None."""
        got = self.get_frames(timeout)
        return None if got is None else (b"".join(f.wire for f in got[0]), got[1])

    def get_frames(self, timeout: float) -> tuple[list[Frame], bool] | None:
        """Wait for events: (every pending frame, reached the end), or None."""
        if not self._wakeup.wait(timeout):
            return None
        with self._lock:
            self._wakeup.clear()
            frames, self._frames = self._frames, []
            ended = self.status == "ended"
        return frames, ended

    def close(self) -> None:
        self._hub.unsubscribe(self)

    # -- called by the hub's reader -----------------------------------------------
    def _drain(self) -> None:
        with self._lock:
            if self.status != "ended":
                self.status = "drained"
        self._ready.set()
        self._wakeup.set()

    def _mark(self, status: str) -> None:
        self.status = status
        self._ready.set()

    def _deliver(self, frames: list[Frame]) -> None:
        with self._lock:
            for frame in frames:
                if self.status == "ended":
                    break
                if frame.id <= self.cursor:
                    # A cursor beyond the real end (made up, or from a stream since
                    # recreated) must still see the stream close, not wait forever.
                    if frame.terminal:
                        self.status = "ended"
                    continue
                self._frames.append(frame)
                self.cursor = frame.id
                if frame.terminal:
                    self.status = "ended"
            if self._frames or self.status == "ended":
                self._wakeup.set()


def _bulk(value: str) -> bytes:
    """One argument of a Redis command as sent (a RESP bulk string)."""
    raw = value.encode()
    return b"$%d\r\n%b\r\n" % (len(raw), raw)


@dataclass(slots=True)
class _Watched:
    key: bytes  # the stream's key, packed for XREAD once
    cursor: str  # the last id the reader has read from this stream
    packed_cursor: bytes = b""
    subs: set[Subscription] = field(default_factory=set)
    last_activity: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.advance(self.cursor)

    def advance(self, cursor: str) -> None:
        self.cursor, self.packed_cursor = cursor, _bulk(cursor)


class StreamHub:
    """Per-process fan-out of generation streams to SSE subscribers."""

    def __init__(
        self,
        redis_url: str,
        keys: RedisKeys,
        stream_ttl: int,
        *,
        block_ms: int = 5000,
        read_count: int = 512,
        pace_s: float = 0.0,
        lease_ttl: float = 6.0,
        reap_interval: float = 2.0,
        reap: Callable[[str], bool] | None = None,
        settle: Callable[[str], Entry | None] | None = None,
        bucket: int = 0,
        locate: Callable[[str, bool], tuple[str, int]] | None = None,
        direct_max: int = 200,
    ) -> None:
        self.id = uuid.uuid4().hex
        self._name = f"tidechat-hub-{self.id[:8]}"
        self._redis_url = redis_url
        self._bucket = bucket
        self._wake_key = keys.hub_wake(self.id, bucket)
        self._packed_wake_key = _bulk(self._wake_key)
        self._moved_key = keys.moved(bucket)
        self._packed_moved_key = _bulk(self._moved_key)
        self._direct_max = direct_max
        # Where the reader is in the moved stream; None while it names every stream itself.
        self._moved_cursor: str | None = None
        self._last_sweep = 0.0
        # On a cluster: which node serves this bucket's slot (again, after an error). The
        # reader talks to that node over a plain connection: redis-py's cluster client
        # would ask a node of its choice which keys each XREAD names, a round trip per
        # read that fails with that node.
        self._locate = locate
        self._node: tuple[str, int] | None = None
        self._keys, self._stream_ttl = keys, stream_ttl
        self._reader: Any = None
        self._waker: Any = None
        self._connect(block_ms)
        # While this reader cannot reach its Redis (on a cluster: its shard), an answer the
        # database records as over (its worker gave up writing it) ends from there.
        self._settle = settle
        self._failing_since: float | None = None
        self._wake_cursor = "0-0"
        self._wake_sent = False
        self._block_ms = block_ms
        self._read_count = read_count
        self._packed_count = _XREAD + _COUNT + _bulk(str(read_count))
        self._pace_s = pace_s
        self._lease_ttl = lease_ttl
        self._reap_interval = reap_interval
        self._reap = reap or (lambda gid: bool(self._bus.reap(gid, WORKER_LOST)))
        # A lease may vanish while its worker lives (Redis restarted, paused): reap only
        # when it is still gone a grace period later, with Redis reachable all along.
        self._unleased = Sightings(2 * lease_ttl)
        self._ok_since: float | None = time.monotonic()
        self._watched: dict[str, _Watched] = {}  # stream key -> state
        self._pending: list[Subscription] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self._last_reap = time.monotonic()

    # -- public API ---------------------------------------------------------------
    def subscribe(self, gid: str, cursor: str = "0", await_stream: bool = False) -> Subscription:
        sub = Subscription(self, gid, cursor, await_stream)
        self._ensure_started()
        with self._lock:
            self._pending.append(sub)
            send_wake = not self._wake_sent
            self._wake_sent = True
        if send_wake:
            self._wake()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        key = self._bus.k(sub.gid).stream
        with self._lock:
            if sub in self._pending:
                self._pending.remove(sub)
            watched = self._watched.get(key)
            if watched is not None:
                watched.subs.discard(sub)
                if not watched.subs:
                    del self._watched[key]

    def stop(self) -> None:
        self._stopping = True
        self._wake()

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        """End every open stream now, this process is stopping: its clients reconnect, with
        their cursors, to a process that stays, instead of waiting for it to be killed."""
        self._draining = True
        with self._lock:
            subs = [sub for w in self._watched.values() for sub in w.subs]
            subs.extend(self._pending)
        for sub in subs:
            sub._drain()

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return sum(len(w.subs) for w in self._watched.values())

    # -- the reader ---------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name=f"tidechat-stream-hub-{self._bucket}", daemon=True
                    )
                    self._thread.start()

    def _connect(self, block_ms: int, again: bool = False) -> None:
        url = self._redis_url
        if self._locate is not None:
            node = self._locate(self._wake_key, again)
            if node == self._node:
                return
            self._node = node
            url = redis_conn.node_url(url, *node)
            for client in (self._reader, self._waker):
                if client is not None:  # the previous node's (a failover): not kept open
                    client.close()
        self._reader, self._waker = _clients(url, self._name, block_ms)
        self._bus = StreamBus(self._reader, self._keys, self._stream_ttl)

    def _wake(self) -> None:
        try:
            with self._waker.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1, approximate=False)
                pipe.expire(self._wake_key, 3600)
                pipe.execute()
        except redis.RedisError:
            log.exception("could not wake the stream hub; it will catch up on its next read")

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._admit_pending()
                self._read_once()
                self._ok_since = self._ok_since or time.monotonic()
                self._failing_since = None
                self._reap_if_due()
                continue
            except redis.ConnectionError as exc:
                log.warning("stream hub lost Redis (%s); retrying", exc)
            except redis.RedisError:
                log.exception("stream hub Redis command failed; retrying")
            except Exception:  # never let the one reader die: every client depends on it
                log.exception("stream hub iteration failed")
            self._ok_since = None
            self._failing_since = self._failing_since or time.monotonic()
            self._settle_if_due()
            time.sleep(0.5)
            if self._locate is not None:  # the slot may have moved (a failover)
                try:
                    self._connect(self._block_ms, again=True)
                except Exception:
                    log.warning("stream hub %d cannot find its cluster node", self._bucket)

    def _settle_if_due(self) -> None:
        """Redis has been out of reach a while: end the streams of answers that are over."""
        now = time.monotonic()
        if (
            self._settle is None
            or self._failing_since is None
            or now - self._failing_since < self._reap_interval
            or now - self._last_reap < self._reap_interval
        ):
            return
        self._last_reap = now
        with self._lock:
            watched = [list(w.subs) for w in self._watched.values() if w.subs]
        for subs in watched:
            try:
                entry = self._settle(subs[0].gid)
            except Exception:
                log.exception("could not read the end of %s from the database", subs[0].gid)
                continue
            if entry is not None:
                frames = [encode_entry(entry)]
                for sub in subs:
                    sub._deliver(frames)

    def _admit_pending(self) -> None:
        with self._lock:
            self._wake_sent = False
            pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            with self._reader.pipeline(transaction=False) as pipe:
                for sub in pending:
                    keys = self._bus.k(sub.gid)
                    pipe.hget(keys.meta, "terminal_id")
                    pipe.exists(keys.meta)
                    pipe.xrevrange(keys.stream, count=1)
                replies = pipe.execute()
        except Exception:  # Redis is out of reach: admit them once it is back
            with self._lock:
                self._pending[:0] = pending
            raise
        for i, sub in enumerate(pending):
            terminal_id, exists, last = replies[3 * i : 3 * i + 3]
            if not exists and not sub.await_stream:
                sub._mark("missing")
            elif terminal_id is not None and sub.cursor >= id_tuple(terminal_id.decode()):
                sub._mark("finished")
            else:
                last_id = id_tuple(last[0][0].decode()) if last else (0, 0)
                try:
                    self._watch(sub, min(sub.cursor, last_id))
                except Exception:  # Redis went away mid-way: admit the rest once it is back
                    with self._lock:
                        self._pending[:0] = pending[i:]
                    raise

    def _watch(self, sub: Subscription, start: tuple[int, int]) -> None:
        """Follow the sub's stream from ``start`` (never past the stream's real end)."""
        key = self._bus.k(sub.gid).stream
        cursor = "{}-{}".format(*start)
        # Only this thread reads and delivers, so the stream's cursor cannot move between
        # the backfill and joining its subscribers. Backfill first: if it fails, the sub
        # has joined nothing, and is admitted again (joined, it would skip the gap).
        with self._lock:
            watched = self._watched.get(key)
            backfill_to = watched.cursor if watched and start < id_tuple(watched.cursor) else None
        frames = []
        if backfill_to is not None:
            # Others are already further along this stream: replay the gap for this one.
            raw = self._reader.xrange(key, min=f"({cursor}", max=backfill_to)
            frames = [encode_entry(parse_entry(i, f)) for i, f in raw]
        with self._lock:
            watched = self._watched.get(key)
            if watched is None:
                watched = self._watched[key] = _Watched(_bulk(key), cursor)
            watched.subs.add(sub)
        sub._mark("live")
        if frames:
            sub._deliver(frames)

    def _read_once(self) -> None:
        with self._lock:
            watched = list(self._watched.values())
        if len(watched) > self._direct_max:
            self._read_moved(watched)
        else:
            self._moved_cursor = None
            self._read_direct(watched)

    def _read_direct(self, watched: list[_Watched]) -> None:
        """One XREAD BLOCK naming every watched stream (and the wake stream)."""
        keys = [w.key for w in watched]
        cursors = [w.packed_cursor for w in watched]
        started = time.monotonic()
        reply = self._xread_blocking(keys, cursors, len(watched))
        self._deliver_reply(reply)
        self._pace(started, reply, len(watched))

    def _read_moved(self, watched: list[_Watched]) -> None:
        """Block on the moved stream, then read only the watched streams it names.

        The moved stream is a capped hint. On entering this mode the reader takes its end
        first, then reads every watched stream once, so an append before that is read
        then and every later one is named after the cursor. It reads them all again every
        reap interval: a hint trimmed away (the reader fell far behind) delays, never loses.
        """
        now = time.monotonic()
        if self._moved_cursor is None or now - self._last_sweep >= self._reap_interval:
            if self._moved_cursor is None:
                last = self._reader.xrevrange(self._moved_key, count=1)
                self._moved_cursor = last[0][0].decode() if last else "0-0"
            self._last_sweep = now
            self._read_to_end(watched)
            return
        started = time.monotonic()
        reply = self._xread_blocking([self._packed_moved_key], [_bulk(self._moved_cursor)], 1)
        moved: set[str] = set()
        for raw_key, raw_entries in reply:
            if raw_entries and raw_key.decode() == self._moved_key:
                self._moved_cursor = raw_entries[-1][0].decode()
                moved.update(_fields(f)[b"k"].decode() for _, f in raw_entries)
        with self._lock:
            targets = [self._watched[k] for k in moved if k in self._watched]
        self._read_to_end(targets)
        self._pace(started, reply, len(watched))

    def _read_to_end(self, targets: list[_Watched]) -> None:
        """Read ``targets`` without blocking, again for those that filled the read's COUNT
        (no hint may follow for what they still hold)."""
        while targets:
            targets = self._deliver_reply(
                self._xread([w.key for w in targets], [w.packed_cursor for w in targets])
            )

    def _xread_blocking(self, keys: list[bytes], cursors: list[bytes], streams: int) -> list:
        """XREAD BLOCK of ``keys`` and this process's wake stream, which ends the wait
        when a client subscribes (its entries are consumed here)."""
        block = self._block_ms
        if streams:
            block = min(block, int(self._reap_interval * 1000))
        started = time.monotonic()
        reply = self._xread([*keys, self._packed_wake_key], [*cursors, _bulk(self._wake_cursor)],
                            block)  # fmt: skip
        now = time.monotonic()
        if now - started > block / 1000 + 2:  # Redis stalled (paused, swapping): an outage
            self._ok_since = now
        for raw_key, raw_entries in reply:
            if raw_entries and raw_key.decode() == self._wake_key:
                self._wake_cursor = raw_entries[-1][0].decode()
        return reply

    def _deliver_reply(self, reply: list) -> list[_Watched]:
        """Hand each watched stream's new entries to its subscribers; return the streams
        that filled the read's COUNT (they may have more)."""
        now = time.monotonic()
        full = []
        for raw_key, raw_entries in reply:
            if not raw_entries:
                continue
            key = raw_key.decode()
            if key == self._wake_key:  # (read by _xread_blocking)
                continue
            frames = [encode_entry(parse_entry(i, _fields(f))) for i, f in raw_entries]
            with self._lock:
                watched = self._watched.get(key)
                if watched is None:
                    continue
                watched.advance(raw_entries[-1][0].decode())
                watched.last_activity = now
                subs = list(watched.subs)
            for sub in subs:
                sub._deliver(frames)
            if len(raw_entries) >= self._read_count:
                full.append(watched)
        return full

    def _pace(self, started: float, reply: list, streams: int) -> None:
        rest = self._pace_s * (streams + 1) - (time.monotonic() - started)
        if reply and rest > 0:  # one read per pace per stream at most: let more gather
            time.sleep(rest)

    def _xread(self, keys: list[bytes], cursors: list[bytes], block: int | None = None) -> list:
        """``XREAD COUNT n [BLOCK ms] STREAMS keys... cursors...``: [(key, [(id, fields)])].

        Sent packed from each stream's key and cursor as packed when they last changed:
        redis-py would pack all 2N arguments again on every read, which with a thousand
        streams watched took most of a web process's CPU (py-spy, the bench's capacity).
        """
        if block is None:
            head = [b"*%d\r\n" % (4 + 2 * len(keys)), self._packed_count, _STREAMS]
        else:
            head = [b"*%d\r\n" % (6 + 2 * len(keys)), self._packed_count, _BLOCK,
                    _bulk(str(block)), _STREAMS]  # fmt: skip
        conn = self._reader.connection
        try:
            conn.send_packed_command([b"".join(head + keys + cursors)])
            reply = conn.read_response()
        except BaseException:
            conn.disconnect()  # a reply may be half read: start the next one afresh
            raise
        if isinstance(reply, dict):  # RESP3
            return list(reply.items())
        return reply or []

    def _reap_if_due(self) -> None:
        """End generations whose worker died: quiet, and their lease gone for a while."""
        now = time.monotonic()
        if now - self._last_reap < self._reap_interval:
            return
        self._last_reap = now
        with self._lock:
            quiet = [
                next(iter(w.subs)).gid
                for w in self._watched.values()
                if w.subs and now - w.last_activity >= self._lease_ttl
            ]
        states = self._bus.states(quiet) if quiet else []
        suspects = {
            gid
            for gid, (meta, leased) in zip(quiet, states, strict=True)
            if meta.get("state") == RUNNING and not leased
        }
        self._unleased.keep(suspects)
        calm = self._ok_since is not None and now - self._ok_since >= self._unleased.grace
        for gid in suspects:
            if self._unleased.due(gid, now) and calm:
                try:
                    if self._reap(gid):
                        self._unleased.clear(gid)
                except Exception:
                    log.exception("could not end the lost generation %s", gid)


_XREAD, _COUNT, _BLOCK, _STREAMS = (_bulk(w) for w in ("XREAD", "COUNT", "BLOCK", "STREAMS"))


def _fields(raw: Any) -> dict:
    """An entry's fields as XREAD sends them (a flat list) as a dict."""
    if isinstance(raw, dict):
        return raw
    it = iter(raw)
    return dict(zip(it, it, strict=True))


def _clients(redis_url: str, name: str, block_ms: int) -> tuple[Any, Any]:
    """The reader's connection (its long BLOCK must not time out) and the waker's."""
    reader = redis.Redis.from_url(
        redis_url,
        single_connection_client=True,
        socket_timeout=block_ms / 1000 + 10,  # redis-py's default would cut a long BLOCK
        socket_keepalive=True,
        client_name=name + "-reader",
    )
    waker = redis.Redis(
        connection_pool=redis.BlockingConnectionPool.from_url(
            redis_url, max_connections=1, timeout=30, client_name=name + "-waker"
        )
    )
    return reader, waker


class ShardedHub:
    """The hub of a web process on a Redis Cluster: one reader per hash-tag bucket.

    Redis Cluster runs a multi-key command only when all its keys share a hash slot, so
    one XREAD cannot follow streams of different buckets. Each bucket gets its own
    ``StreamHub``, with a reader and a waker connection to the node serving that bucket,
    so a web process holds two connections per bucket however many clients it serves
    (plus one cluster client that only says which node serves which slot). A shard out of
    reach stalls only the buckets it serves.
    """

    def __init__(self, redis_url: str, keys: RedisKeys, stream_ttl: int, **options: Any) -> None:
        self._keys = keys
        self._map = redis_conn.client(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self._map_lock = threading.Lock()
        self._hubs = [
            StreamHub(redis_url, keys, stream_ttl, bucket=b, locate=self._locate, **options)
            for b in range(keys.buckets)
        ]

    def _locate(self, key: str, again: bool) -> tuple[str, int]:
        with self._map_lock:
            if again:  # after an error: ask the cluster (a reachable node) afresh
                self._map.nodes_manager.initialize()
            node = self._map.get_node_from_key(key)
        return node.host, int(node.port)

    def subscribe(self, gid: str, cursor: str = "0", await_stream: bool = False) -> Subscription:
        return self._hubs[self._keys.bucket(gid)].subscribe(gid, cursor, await_stream)

    def unsubscribe(self, sub: Subscription) -> None:
        sub.close()

    def stop(self) -> None:
        for hub in self._hubs:
            hub.stop()

    @property
    def draining(self) -> bool:
        return self._hubs[0].draining

    def drain(self) -> None:
        for hub in self._hubs:
            hub.drain()

    @property
    def subscriber_count(self) -> int:
        return sum(hub.subscriber_count for hub in self._hubs)


def make_hub(redis_url: str, keys: RedisKeys, stream_ttl: int, **options: Any) -> Any:
    """This web process's hub: a ``StreamHub``, or on a Redis Cluster a ``ShardedHub``."""
    if keys.clustered:
        return ShardedHub(redis_url, keys, stream_ttl, **options)
    return StreamHub(redis_url, keys, stream_ttl, **options)
