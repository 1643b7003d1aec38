"""The stream bus: one Redis Stream per generation, plus its small state hash.

Writers (the worker, the cancel endpoint, the reaper) go through the Lua scripts here, so
a generation gets exactly one terminal entry (``done`` or ``error``) whoever writes it,
and nothing is appended after it. Readers see entries as ``(id, event, data)`` where
``data`` is the event's JSON payload, stored pre-encoded so the web process sends it as is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from tidechat import metrics
from tidechat.redis_keys import GenerationKeys, RedisKeys

log = logging.getLogger(__name__)

DELTA, DONE, ERROR = "delta", "done", "error"
TERMINAL_EVENTS = frozenset({DONE, ERROR})
# Generation states, shared with the database's message status.
QUEUED, RUNNING = "queued", "running"

WORKER_LOST = {
    "code": "worker_lost",
    "message": "The worker generating this answer stopped unexpectedly. Please retry.",
}


def lost_end(text: str) -> dict[str, str]:
    """The end of a stream Redis lost: it carries the whole answer so far, since clients
    may have missed its last part with the entries Redis lost."""
    return {**STATE_LOST, "text": text}


STATE_LOST = {
    "code": "state_lost",
    "message": "The server lost this answer's live state (its Redis restarted empty). "
    "The text so far is kept; please retry.",
}
UNAVAILABLE = {
    "code": "unavailable",
    "message": "The server could not store this answer as it streamed (its Redis refused "
    "writes). The text so far is kept; please retry.",
}
QUEUE_TIMEOUT = {
    "code": "queue_timeout",
    "message": "No worker started this answer in time. Please retry.",
}

_CURSOR = re.compile(r"[0-9]{1,20}-[0-9]{1,20}|0")  # ASCII digits only: use fullmatch

# Append results that are not stream ids.
STOPPED, GONE = "stopped", "gone"

# On Redis 7+, every script that may end a generation is flagged allow-oom: when Redis is
# full (maxmemory, noeviction) no delta can be appended, but the one terminal entry that
# tells clients so still can be. Appends are not flagged: they are what must be refused.
# (Redis 6 has no script flags: there the end waits until Redis has room again.)
_ALLOW_OOM = "#!lua flags=allow-oom\n"

# KEYS: meta, lease[, metrics] | ARGV: lease_ms, now_ms, worker[, started field]
# -> {fence, last seq} if this caller now runs the generation, else false.
# Each claim takes a new fence: a writer from an earlier claim (its worker stalled, then
# the generation was handed on) can no longer append or end it. With the app's metrics
# hash (one server; on a cluster it lives in another slot), a first run is counted there.
_CLAIM = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return false end
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[2], 'worker', ARGV[3])
redis.call('SET', KEYS[2], fence, 'PX', ARGV[1])
if KEYS[3] and fence == 1 then redis.call('HINCRBY', KEYS[3], ARGV[4], 1) end
return {fence, tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')}
"""

# Every script that adds to a generation's stream also adds the stream's key to its bucket's
# moved stream (capped at about 10,000: only a hint), so that a hub watching many streams
# reads those that moved instead of naming them all (tidechat/stream_hub.py).

# KEYS: stream, meta, moved | ARGV: fence, seq, event, data, event, data, ...
# -> the last id; the current last id if this seq was already appended (a retry after a
# partial failure); "stopped" if the generation is no longer this writer's (cancelled
# before it started, reaped, handed on); "gone" if Redis lost its state.
_APPEND = """
local meta = redis.call('HMGET', KEYS[2], 'state', 'fence', 'seq')
if not meta[1] then return 'gone' end
if meta[1] ~= 'running' or meta[2] ~= ARGV[1] then return 'stopped' end
if tonumber(ARGV[2]) <= tonumber(meta[3] or '0') then
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  return last[1] and last[1][1] or '0-0'
end
local last = false
for i = 3, #ARGV, 2 do
  last = redis.call('XADD', KEYS[1], '*', 'event', ARGV[i], 'data', ARGV[i + 1])
end
redis.call('HSET', KEYS[2], 'seq', ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', 'k', KEYS[1])
return last
"""

# KEYS: stream, meta, lease, cancel, moved | ARGV: event, data, final_state, ttl_s, mode, fence
# mode "running": the worker holding this fence ends it;
# mode "queued":  it ends before any worker started it (cancel, queue timeout, give-up);
# mode "reap":    its worker's lease is gone (the worker died): a reader or the sweeper;
# mode "lost":    Redis lost its state (restart without persistence, flush, failover):
#                 a fresh terminal entry, so open streams still end.
# -> {the terminal entry's id, started_at, queued_at, the stream's first entry id, the
# active sets it joined} (for the end's bookkeeping, without more round trips), false if
# another writer ended it first, "gone" (mode "running") if its state is lost.
_FINISH = (
    _ALLOW_OOM
    + """
local state = redis.call('HGET', KEYS[2], 'state')
local mode = ARGV[5]
if mode == 'lost' then
  if state then return false end
elseif not state then
  if mode == 'running' then return 'gone' end
  return false
elseif mode == 'reap' then
  if state ~= 'running' or redis.call('EXISTS', KEYS[3]) == 1 then return false end
elseif state ~= mode then
  return false
elseif mode == 'running' and redis.call('HGET', KEYS[2], 'fence') ~= ARGV[6] then
  return false
end
local id = redis.call('XADD', KEYS[1], '*', 'event', ARGV[1], 'data', ARGV[2])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', 10000, '*', 'k', KEYS[1])
local times = redis.call('HMGET', KEYS[2], 'started_at', 'queued_at', 'active')
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1]
redis.call('HSET', KEYS[2], 'state', ARGV[3], 'terminal_id', id)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('DEL', KEYS[3], KEYS[4])
return {id, times[1], times[2], first, times[3]}
"""
)

# KEYS: meta, lease | ARGV: fence, now_ms -> 1 if released: queued again, for another
# worker to continue (a deploy: this worker is stopping), 0 if no longer this worker's.
_RELEASE = (
    _ALLOW_OOM
    + """
local meta = redis.call('HMGET', KEYS[1], 'state', 'fence')
if meta[1] ~= 'running' or meta[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued', 'queued_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'handoffs', 1)
redis.call('DEL', KEYS[2])
return 1
"""
)

# Renews the leases of several generations of one hash slot. KEYS: per generation its meta,
# lease and cancel keys; ARGV: the lease's ms, then each generation's fence. Returns per
# generation: held, then whether a cancel was requested. held: 1 renewed, or taken again
# after Redis lost the key (an outage, a restart from disk) while the generation is still
# this fence's; 0 no longer this worker's; -1 Redis has lost the generation's state.
_RENEW = (
    _ALLOW_OOM
    + """
local out = {}
for i = 1, #KEYS / 3 do
  local meta, lease, fence = KEYS[3 * i - 2], KEYS[3 * i - 1], ARGV[i + 1]
  local cancel = redis.call('EXISTS', KEYS[3 * i])
  local holder = redis.call('GET', lease)
  local held = 1
  if holder == fence then
    redis.call('PEXPIRE', lease, ARGV[1])
  else
    local state = redis.call('HMGET', meta, 'state', 'fence')
    if not state[1] then
      held = -1
    elseif holder or state[1] ~= 'running' or state[2] ~= fence then
      held = 0
    else
      redis.call('SET', lease, fence, 'PX', ARGV[1])
    end
  end
  out[2 * i - 1], out[2 * i] = held, cancel
end
return out
"""
)
# Leases renewed per script call: one call per slot and chunk (Redis runs nothing else while
# a script runs; this many take it well under a millisecond).
_RENEW_CHUNK = 200


def dumps(payload: Any) -> str:
    return orjson.dumps(payload).decode()


_MAX_ID_PART = 2**64 - 1  # Redis stream ids are two unsigned 64-bit numbers


def valid_cursor(cursor: str) -> bool:
    """A stream id Redis accepts: checked by value too, since one out of range would make
    the hub's shared XREAD fail for every client of the process."""
    return bool(_CURSOR.fullmatch(cursor)) and max(id_tuple(cursor)) <= _MAX_ID_PART


def id_tuple(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    event: str
    data: str

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS

    def payload(self) -> dict[str, Any]:
        return orjson.loads(self.data)


def parse_entry(entry_id: bytes | str, fields: dict) -> Entry:
    def text(value: bytes | str) -> str:
        return value.decode() if isinstance(value, bytes) else value

    return Entry(
        id=text(entry_id),
        event=text(fields.get(b"event", fields.get("event", b""))),
        data=text(fields.get(b"data", fields.get("data", b"null"))),
    )


class _OomScript:
    """A script flagged allow-oom where the server knows script flags (Redis 7+)."""

    _flags: dict[int, bool] = {}  # per connection pool: does its server take flags?

    def __init__(self, client: redis.Redis, source: str) -> None:
        self.client = client
        self.flagged = client.register_script(source)
        self.plain = client.register_script(source.removeprefix(_ALLOW_OOM))

    def __call__(self, keys: list[str], args: list[Any], client: Any = None) -> Any:
        pool = id(self.client)
        takes_flags = self._flags.get(pool)
        if takes_flags is None:
            info = self.client.info("server")
            if "redis_version" not in info:  # a cluster answers per node: {node: info}
                info = next(iter(info.values()), {})
            version = str(info.get("redis_version", "0"))
            takes_flags = self._flags[pool] = int(version.split(".")[0]) >= 7
        script = self.flagged if takes_flags else self.plain
        return script(keys=keys, args=args, client=client)


@dataclass(frozen=True, slots=True)
class Claim:
    fence: int  # this run's fencing token: only it may append or end the generation
    seq: int  # the last delta batch appended (by an earlier run, handed on): go on after it


def process_name() -> str:
    """This process as the operator sees it (host:pid): the worker running an answer."""
    return f"{socket.gethostname()}:{os.getpid()}"


class StreamBus:
    """Reads and writes generations' streams through one redis-py client."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, stream_ttl: int) -> None:
        self.redis = client
        self.keys = keys
        self.stream_ttl = int(stream_ttl)
        self._claim = client.register_script(_CLAIM)
        self._append = client.register_script(_APPEND)
        self._finish = _OomScript(client, _FINISH)
        self._release = _OomScript(client, _RELEASE)
        self._renew = _OomScript(client, _RENEW)

    def k(self, gid: str) -> GenerationKeys:
        return self.keys.generation(gid)

    def by_node(self, gids: list[str]) -> list[tuple[Any, list[int]]]:
        """The generations (by index) grouped by the server holding their keys, each with a
        plain client of that server: its pipelines may run scripts (a cluster pipeline
        may not), and one server out of reach fails only its own group.

        On one server: one group, this bus's own client.
        """
        if not self.keys.clustered:
            return [(self.redis, list(range(len(gids))))] if gids else []
        groups: dict[str, tuple[Any, list[int]]] = {}
        for i, gid in enumerate(gids):
            node = self.redis.get_node_from_key(self.k(gid).meta)
            groups.setdefault(node.name, (node.redis_connection, []))[1].append(i)
        return list(groups.values())

    def app_client(self) -> Any:
        """A plain client of the server holding the app-wide keys: on a cluster, of the node
        serving their hash tag (its pipelines may run scripts; a cluster pipeline may not).
        After it fails, :meth:`refresh_nodes`."""
        if not self.keys.clustered:
            return self.redis
        return self.redis.get_node_from_key(self.keys.metrics()).redis_connection

    def refresh_nodes(self) -> None:
        """After a failure on a cluster: learn which node serves which slot again."""
        if self.keys.clustered:
            with contextlib.suppress(redis.RedisError):
                self.redis.nodes_manager.initialize()

    # -- lifecycle -------------------------------------------------------------------
    def create(self, gid: str, active: Sequence[str] = (), pipe: Any = None) -> None:
        """A new generation, queued; its keys live until it finishes (then STREAM_TTL).
        ``active``: the sets of answers not yet over that it joined (limits.admit); its
        end leaves them. With ``pipe``, queued there (it happens at ``pipe.execute()``)."""
        if pipe is None:
            with self.redis.pipeline(transaction=False) as pipe:
                self.create(gid, active, pipe)
                pipe.execute()
            return
        k = self.k(gid)
        meta = {"state": QUEUED, "queued_at": now_ms()}
        if active:
            meta["active"] = "\n".join(active)
        pipe.hset(k.meta, mapping=meta)
        pipe.expire(k.meta, self.stream_ttl * 24)
        metrics.count(pipe, self.keys, "generations_queued")  # (app-wide: another slot)

    def claim(self, gid: str, lease_ms: int) -> Claim | None:
        k = self.k(gid)
        keys, args = [k.meta, k.lease], [lease_ms, now_ms(), process_name()]
        if not self.keys.clustered:  # the start's count rides along
            keys.append(self.keys.metrics())
            args.append(metrics.field("generations_started"))
        got = self._claim(keys=keys, args=args)
        if not got:
            return None
        claim = Claim(int(got[0]), int(got[1]))
        if self.keys.clustered and claim.fence == 1:  # its first run (not one handed on)
            with contextlib.suppress(redis.RedisError):  # bookkeeping: the claim stands
                metrics.count(self.redis, self.keys, "generations_started")
        return claim

    def append(
        self, gid: str, fence: int, seq: int, events: list[tuple[str, str]], pipe: Any = None
    ) -> str | None:
        """Append events as batch ``seq`` of this run, in one script call, at most once.

        Returns the last id, ``STOPPED`` or ``GONE`` (see ``_APPEND``). With ``pipe`` (a
        pipeline: anything with redis-py's ``execute_command``), the call is queued there
        and its reply comes from ``pipe.execute()``.
        """
        k = self.k(gid)
        keys = [k.stream, k.meta, k.moved]
        args = [fence, seq, *(part for pair in events for part in pair)]
        if pipe is None:
            return _text(self._append(keys=keys, args=args))
        # A bare EVALSHA: redis-py's Script in a pipeline first asks the server whether
        # the script exists, one more round trip per execute. A server that lost its
        # scripts (a restart) answers NoScriptError: load_scripts(), then run it again.
        pipe.execute_command("EVALSHA", self._append.sha, len(keys), *keys, *args)
        return None

    def load_scripts(self, client: Any) -> None:
        """Load the scripts that pipelines run as bare EVALSHAs on ``client`` (a server
        that answered NoScriptError: restarted, or one cluster node)."""
        client.script_load(self._append.script)

    def finish(
        self, gid: str, event: str, payload: dict, final_state: str, fence: int
    ) -> str | None:
        """The worker holding ``fence`` writes the one terminal entry: its id, None if
        another writer ended it first, or ``GONE`` if Redis lost its state."""
        return self._end(gid, event, payload, final_state, RUNNING, fence)

    def cancel_queued(self, gid: str) -> str | None:
        """End a generation no worker has started yet. None if one already has."""
        payload = {"finish_reason": "cancelled", "usage": None}
        return self._end(gid, DONE, payload, "cancelled", QUEUED)

    def fail_queued(self, gid: str, payload: dict) -> str | None:
        """End a queued generation with an error (it could not be started)."""
        return self._end(gid, ERROR, payload, ERROR, QUEUED)

    def reap(
        self, gid: str, payload: dict, event: str = ERROR, final_state: str = ERROR
    ) -> str | None:
        """End a running generation whose worker lease has expired (the worker died)."""
        return self._end(gid, event, payload, final_state, "reap")

    def end_lost(self, gid: str, event: str, payload: dict, final_state: str) -> str | None:
        """Redis lost this generation's state: write a fresh terminal entry, so that every
        stream still open on it ends. None if its state exists after all."""
        return self._end(gid, event, payload, final_state, "lost")

    def _end(
        self, gid: str, event: str, payload: dict, state: str, mode: str, fence: int = 0
    ) -> str | None:
        k = self.k(gid)
        result = self._finish(
            keys=[k.stream, k.meta, k.lease, k.cancel, k.moved],
            args=[event, dumps(payload), state, self.stream_ttl, mode, fence],
        )
        if not isinstance(result, list):
            return _text(result) or None  # GONE, or None: not this call's to end
        # This call wrote the one terminal entry: count it, with the times the script read,
        # and leave the active sets (in one round trip: they live in other hash slots).
        ended, started_at, queued_at, first_id, active = (_text(v) for v in result)
        timing = metrics.EndTiming(ended, first_id, started_at, queued_at)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                metrics.record_end(pipe, self.keys, timing, state, payload, mode)
                for key in filter(None, (active or "").split("\n")):
                    pipe.zrem(key, gid)
                pipe.execute()
        except (redis.RedisError, ValueError):  # bookkeeping: the end itself stands
            log.info("could not count the end of %s", gid, exc_info=True)
        return ended

    def release(self, gid: str, fence: int) -> bool:
        """Queue a running generation again for another worker to continue (a deploy)."""
        k = self.k(gid)
        return bool(self._release(keys=[k.meta, k.lease], args=[fence, now_ms()]))

    # -- lease and cancel ------------------------------------------------------------
    def renew_and_check(self, held: list[tuple[str, int]], lease_ms: int) -> list[tuple[int, bool]]:
        """Renew these (generation, fence) leases in one round trip per server (a script
        call per hash slot and ``_RENEW_CHUNK`` of them, not one per generation), taking
        back any that Redis lost while the generation is still ours.

        Returns (1 held / 0 not ours any more / -1 state lost, cancel requested) for each.
        """
        out: list[tuple[int, bool]] = [(1, False)] * len(held)
        groups = self.by_node([gid for gid, _ in held])
        failed: list[redis.RedisError] = []
        for client, indexes in groups:
            calls = self._renew_calls(held, indexes)
            try:
                with client.pipeline(transaction=False) as pipe:
                    for call in calls:
                        keys = [key for i in call for key in self._lease_keys(held[i][0])]
                        args = [lease_ms, *(held[i][1] for i in call)]
                        self._renew(keys=keys, args=args, client=pipe)
                    replies = pipe.execute()
            except redis.RedisError as exc:
                # A cluster shard out of reach: its generations' writes fail too (and end
                # them); the others' leases must not lapse meanwhile.
                failed.append(exc)
                continue
            for call, reply in zip(calls, replies, strict=True):
                for j, i in enumerate(call):
                    out[i] = (int(reply[2 * j]), bool(reply[2 * j + 1]))
        if failed:
            self.refresh_nodes()
            if len(failed) == len(groups):
                raise failed[0]
        return out

    def _renew_calls(self, held: list[tuple[str, int]], indexes: list[int]) -> list[list[int]]:
        """``indexes`` split into script calls: one hash slot each (a bucket on a cluster),
        at most ``_RENEW_CHUNK`` generations."""
        by_bucket: dict[int, list[int]] = {}
        for i in indexes:
            by_bucket.setdefault(self.keys.bucket(held[i][0]), []).append(i)
        return [
            group[start : start + _RENEW_CHUNK]
            for group in by_bucket.values()
            for start in range(0, len(group), _RENEW_CHUNK)
        ]

    def _lease_keys(self, gid: str) -> tuple[str, str, str]:
        k = self.k(gid)
        return k.meta, k.lease, k.cancel

    def request_cancel(self, gid: str) -> None:
        """Set the cancel flag, and tell the worker running it at once."""
        if self.keys.clustered:  # (a cluster pipeline may not PUBLISH)
            self.redis.set(self.k(gid).cancel, "1", ex=self.stream_ttl)
            self.redis.publish(self.keys.cancel_channel(), gid)
            return
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.k(gid).cancel, "1", ex=self.stream_ttl)
            pipe.publish(self.keys.cancel_channel(), gid)
            pipe.execute()

    # -- reading ---------------------------------------------------------------------
    def meta(self, gid: str) -> dict[str, str]:
        raw = self.redis.hgetall(self.k(gid).meta)
        return {_text(key): _text(value) for key, value in raw.items()}

    def states(self, gids: list[str]) -> list[tuple[dict[str, str], bool]]:
        """Each generation's meta hash and whether a worker's lease on it exists."""
        with self.redis.pipeline(transaction=False) as pipe:
            for gid in gids:
                pipe.hgetall(self.k(gid).meta)
                pipe.exists(self.k(gid).lease)
            replies = pipe.execute()
        out = []
        for i in range(0, len(replies), 2):
            meta = {_text(key): _text(value) for key, value in replies[i].items()}
            out.append((meta, bool(replies[i + 1])))
        return out

    def entries(self, gid: str, after: str = "0") -> list[Entry]:
        start = "-" if after == "0" else f"({after}"
        raw = self.redis.xrange(self.k(gid).stream, min=start)
        return [parse_entry(entry_id, fields) for entry_id, fields in raw]


def now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
