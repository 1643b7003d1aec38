"""The stream bus: one Redis Stream per generation, plus its small state hash.

Writers (the worker, the cancel endpoint, the reaper) go through the Lua scripts here, so
a generation gets exactly one terminal entry (``done`` or ``error``) whoever writes it,
and nothing is appended after it. Readers see entries as ``(id, event, data)`` where
``data`` is the event's JSON payload, stored pre-encoded so the web process sends it as is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from tidechat.redis_keys import GenerationKeys, RedisKeys

DELTA, DONE, ERROR = "delta", "done", "error"
TERMINAL_EVENTS = frozenset({DONE, ERROR})
# Generation states, shared with the database's message status.
QUEUED, RUNNING = "queued", "running"

WORKER_LOST = {
    "code": "worker_lost",
    "message": "The worker generating this answer stopped unexpectedly. Please retry.",
}

_CURSOR = re.compile(r"^\d{1,20}-\d{1,20}$|^0$")

# KEYS: meta, lease | ARGV: lease_ms, holder -> 1 if this caller now runs the generation.
_CLAIM = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'running')
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[1])
return 1
"""

# KEYS: stream, meta | ARGV: event, data, event, data, ... -> last id, or false when the
# generation is no longer running (cancelled before start, or reaped).
_APPEND = """
if redis.call('HGET', KEYS[2], 'state') ~= 'running' then return false end
local last = false
for i = 1, #ARGV, 2 do
  last = redis.call('XADD', KEYS[1], '*', 'event', ARGV[i], 'data', ARGV[i + 1])
end
return last
"""

# KEYS: stream, meta, lease, cancel | ARGV: event, data, final_state, ttl_s, mode
# mode "running": the worker running it ends it;
# mode "queued":  a cancel ends it before any worker started it;
# mode "reap":    a reader ends it because its worker's lease expired (the worker died).
_FINISH = """
local state = redis.call('HGET', KEYS[2], 'state')
local mode = ARGV[5]
if mode == 'reap' then
  if state ~= 'running' or redis.call('EXISTS', KEYS[3]) == 1 then return false end
elseif state ~= mode then
  return false
end
local id = redis.call('XADD', KEYS[1], '*', 'event', ARGV[1], 'data', ARGV[2])
redis.call('HSET', KEYS[2], 'state', ARGV[3], 'terminal_id', id)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('DEL', KEYS[3], KEYS[4])
return id
"""


def dumps(payload: Any) -> str:
    return orjson.dumps(payload).decode()


_MAX_ID_PART = 2**64 - 1  # Redis stream ids are two unsigned 64-bit numbers


def valid_cursor(cursor: str) -> bool:
    """A stream id Redis accepts: checked by value too, since one out of range would make
    the hub's shared XREAD fail for every client of the process."""
    return bool(_CURSOR.match(cursor)) and max(id_tuple(cursor)) <= _MAX_ID_PART


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


class StreamBus:
    """Reads and writes generations' streams through one redis-py client."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, stream_ttl: int) -> None:
        self.redis = client
        self.keys = keys
        self.stream_ttl = int(stream_ttl)
        self._claim = client.register_script(_CLAIM)
        self._append = client.register_script(_APPEND)
        self._finish = client.register_script(_FINISH)

    def k(self, gid: str) -> GenerationKeys:
        return self.keys.generation(gid)

    # -- lifecycle -------------------------------------------------------------------
    def create(self, gid: str) -> None:
        """A new generation, queued; its keys live until it finishes (then STREAM_TTL)."""
        k = self.k(gid)
        with self.redis.pipeline() as pipe:
            pipe.hset(k.meta, mapping={"state": QUEUED})
            pipe.expire(k.meta, self.stream_ttl * 24)
            pipe.execute()

    def claim(self, gid: str, holder: str, lease_ms: int) -> bool:
        k = self.k(gid)
        return bool(self._claim(keys=[k.meta, k.lease], args=[lease_ms, holder]))

    def append(self, gid: str, events: list[tuple[str, str]], pipe: Any = None) -> str | None:
        """Append events in one script call; None if the generation is no longer running.

        With ``pipe``, the call is queued there and its reply comes from ``pipe.execute()``.
        """
        k = self.k(gid)
        flat = [part for pair in events for part in pair]
        last = self._append(keys=[k.stream, k.meta], args=flat, client=pipe)
        return None if pipe is not None else _text(last)

    def finish(self, gid: str, event: str, payload: dict, final_state: str) -> str | None:
        """The worker writes the one terminal entry. None if another writer ended it first."""
        return self._end(gid, event, payload, final_state, RUNNING)

    def cancel_queued(self, gid: str) -> str | None:
        """End a generation no worker has started yet. None if one already has."""
        payload = {"finish_reason": "cancelled", "usage": None}
        return self._end(gid, DONE, payload, "cancelled", QUEUED)

    def reap(self, gid: str, payload: dict) -> str | None:
        """End a running generation whose worker lease has expired (the worker died)."""
        return self._end(gid, ERROR, payload, ERROR, "reap")

    def _end(self, gid: str, event: str, payload: dict, state: str, mode: str) -> str | None:
        k = self.k(gid)
        result = self._finish(
            keys=[k.stream, k.meta, k.lease, k.cancel],
            args=[event, dumps(payload), state, self.stream_ttl, mode],
        )
        return _text(result)

    # -- lease and cancel ------------------------------------------------------------
    def renew_and_check(self, gids: list[str], lease_ms: int) -> list[tuple[bool, bool]]:
        """Renew these generations' leases in one round trip.

        Returns (lease still held, cancel requested) for each.
        """
        with self.redis.pipeline(transaction=False) as pipe:
            for gid in gids:
                k = self.k(gid)
                pipe.pexpire(k.lease, lease_ms)
                pipe.exists(k.cancel)
            replies = pipe.execute()
        return [(bool(replies[i]), bool(replies[i + 1])) for i in range(0, len(replies), 2)]

    def request_cancel(self, gid: str) -> None:
        """Set the cancel flag, and tell the worker running it at once."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.k(gid).cancel, "1", ex=self.stream_ttl)
            pipe.publish(self.keys.cancel_channel(), gid)
            pipe.execute()

    # -- reading ---------------------------------------------------------------------
    def meta(self, gid: str) -> dict[str, str]:
        raw = self.redis.hgetall(self.k(gid).meta)
        return {_text(key): _text(value) for key, value in raw.items()}

    def entries(self, gid: str, after: str = "0") -> list[Entry]:
        start = "-" if after == "0" else f"({after}"
        raw = self.redis.xrange(self.k(gid).stream, min=start)
        return [parse_entry(entry_id, fields) for entry_id, fields in raw]


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
