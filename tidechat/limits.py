"""Abuse and cost limits, per account and per client address: every door calls these.

- **Rates**, counted in Redis per account *and* per client address, so dropping the cookie
  (a new guest per request) does not reset anything: every write, and sign-up and sign-in
  attempts, through Flask-Limiter; answers started (send, regenerate and continue share one
  bucket) in the admission's own script call (:func:`admit`), with the same notation and
  fixed windows. Flask-Limiter's check is a Redis round trip per limit: four for the
  answers' two windows per account and address, most of what an answer's POST spent on
  Redis. Only answers admitted count: one refused for any reason gives its count back.
- **Admission** of an answer (:func:`admit`): a cap on answers queued or streaming at
  once, per account and per address; a global backlog limit (429 with ``Retry-After`` when
  the queue is too deep); the daily token quota. It also picks the answer's queue priority:
  an account's first running answer goes before its second, so one busy user cannot starve
  the rest (fair scheduling over Celery's Redis priority queues).
- **Open event streams** per account and per address (:class:`StreamSlots`).
- **Tokens** used per account and UTC day (:func:`count_tokens`), from the model's ``usage``
  or estimated from the text when the backend sends none.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import limits as rate_items
import redis
from flask import Flask, Response, current_app
from flask_limiter import Limiter

from tidechat import accounts, metrics, policy
from tidechat.errors import ApiError
from tidechat.redis_keys import RedisKeys

log = logging.getLogger(__name__)

# Celery priority levels (0 first): an answer's level is how many of its account's answers
# are already queued or running.
PRIORITY_LEVELS = 4
# An answer just admitted may not have its stream state yet: count it for this long anyway.
_ADMIT_GRACE_S = 60
_STREAM_TTL_S = 90  # an open stream's slot expires unless its process renews it
_STREAM_RENEW_S = 30
_KOMBU_SEP = "\x06\x16"  # kombu.transport.redis's separator of a queue and its level


# The environment that turns every limit off, for one trusted client at one address that
# opens many identities (the test suite, bench/): never for a public deployment.
UNLIMITED_ENV = {
    "TIDECHAT_RATE_LIMIT_MESSAGES": "1000000/minute",
    "TIDECHAT_RATE_LIMIT_MESSAGES_IP": "1000000/minute",
    "TIDECHAT_RATE_LIMIT_WRITES": "1000000/minute",
    "TIDECHAT_RATE_LIMIT_WRITES_IP": "1000000/minute",
    "TIDECHAT_RATE_LIMIT_AUTH_IP": "1000000/minute",
    "TIDECHAT_MAX_ACTIVE_ANSWERS": "0",
    "TIDECHAT_MAX_ACTIVE_ANSWERS_IP": "0",
    "TIDECHAT_MAX_STREAMS": "0",
    "TIDECHAT_MAX_STREAMS_IP": "0",
    "TIDECHAT_MAX_QUEUED": "0",
    "TIDECHAT_DAILY_TOKENS": "0",
}


def account_key() -> str:
    return "acct:" + accounts.current_owner()


def ip_key() -> str:
    return "ip:" + accounts.client_address()


limiter = Limiter(key_func=account_key, default_limits=[])


def init_app(app: Flask) -> None:
    app.config.setdefault("RATELIMIT_STORAGE_URI", app.config["REDIS_URL"])
    app.config.setdefault("RATELIMIT_KEY_PREFIX", app.config["KEY_PREFIX"] + "ratelimit")
    # Flask-Limiter's headers on every response cost two Redis round trips per request (the
    # window's expiry and count); a refusal still gets them (_explain_refusal).
    app.config.setdefault("RATELIMIT_HEADERS_ENABLED", False)
    # While its Redis is down, count in this process's memory instead of failing requests.
    app.config.setdefault("RATELIMIT_IN_MEMORY_FALLBACK_ENABLED", True)
    app.config.setdefault("RATELIMIT_SWALLOW_ERRORS", True)
    limiter.init_app(app)
    for name in ("RATE_LIMIT_MESSAGES", "RATE_LIMIT_MESSAGES_IP"):
        _rates(app.config[name])  # a malformed setting fails here, not on each answer
    app.after_request(_on_refusal)
    bus_redis = app.extensions["stream_bus"].redis
    app.extensions["admission_scripts"] = {
        source: bus_redis.register_script(source) for source in (_ADMIT, _WITHDRAW)
    }
    app.extensions["stream_slots"] = StreamSlots(bus_redis, app.extensions["redis_keys"])


def _on_refusal(response: Response) -> Response:
    """Every 429: say when to come back, and count it app-wide by its code (best effort:
    Redis may be what failed)."""
    if response.status_code == 429:
        _explain_refusal(response)
        body = response.get_json(silent=True) or {}
        code = str((body.get("error") or {}).get("code") or "rate_limited")
        with contextlib.suppress(redis.RedisError):
            metrics.count(
                current_app.extensions["stream_bus"].redis,
                current_app.extensions["redis_keys"], "rate_limited", code,
            )  # fmt: skip
    return response


def _explain_refusal(response: Response) -> None:
    """A rate limit's refusal gets the limit, what is left of it, its reset (epoch s) and
    ``Retry-After``. (The other 429s, ApiError's, carry their own ``Retry-After``.)"""
    limit = limiter.current_limit
    if limit is None or not limit.breached:
        return
    try:
        reset, remaining = limit.window
    except Exception:  # the counters' Redis is out of reach: at worst, a whole window
        log.info("could not read the window of %s", limit.limit, exc_info=True)
        reset, remaining = time.time() + limit.limit.get_expiry(), 0
    now = time.time()  # after the read: its reset is "now" plus a whole number of seconds
    response.headers.update(_rate_headers(limit.limit.amount, remaining, reset))
    response.headers.setdefault("Retry-After", str(max(1, math.ceil(reset - now))))


def _rate_headers(amount: int, remaining: int, reset: float) -> dict[str, str]:
    """A rate limit's refusal headers, but ``Retry-After`` (``reset``: epoch seconds)."""
    return {
        "X-RateLimit-Limit": str(amount),
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": str(math.ceil(reset)),
    }


def _setting(name: str) -> Callable[[], str]:
    return lambda: current_app.config[name]


def _per_account_and_ip(scope: str, name: str) -> Callable:
    by_account = limiter.shared_limit(_setting(name), scope=scope, key_func=account_key)
    by_ip = limiter.shared_limit(_setting(name + "_IP"), scope=scope + "-ip", key_func=ip_key)
    return lambda view: by_account(by_ip(view))


def writes(view: Callable) -> Callable:
    """Every write an account makes other than starting an answer (create, rename,
    delete, cancel, ...)."""
    return _per_account_and_ip("writes", "RATE_LIMIT_WRITES")(view)


auth_attempts = limiter.limit(_setting("RATE_LIMIT_AUTH_IP"), key_func=ip_key, scope="auth")


def rejected(code: str, message: str, retry_after: int) -> ApiError:
    return ApiError(429, code, message, retry_after=max(1, retry_after))


# --- admission of an answer -----------------------------------------------------------


@dataclass(frozen=True)
class RateWindow:
    """One of the answers' rate limits for one account or address, and its counter."""

    key: str
    amount: int
    seconds: int
    label: str  # "20 per 1 minute per account"


# Admission's Redis work, one script call each way. Every key in them is app-wide, so on a
# cluster they share one hash tag (one slot, one node). A rate window opens at its first
# answer, as Flask-Limiter's fixed windows do.
_COUNT_FN = """
local function count(keys, by, lengths)
  local out = {}
  for i, key in ipairs(keys) do
    local n = redis.call('INCRBY', key, by)
    local ttl = redis.call('PTTL', key)
    if ttl < 0 then  -- a new window (or a counter given back after its window ended)
      ttl = tonumber(lengths[i]) * 1000
      redis.call('PEXPIRE', key, ttl)
    end
    out[2 * i - 1], out[2 * i] = n, ttl
  end
  return out
end
local function split(first, n)  -- KEYS[first..first+n-1]
  local part = {}
  for i = 1, n do part[i] = KEYS[first + i - 1] end
  return part
end
"""
# KEYS: the rate counters, the day's tokens (with a quota), the queues, the active sets.
# ARGV: #counters, quota (0/1), #queues, gid, now, the score at or before which a member is
# over, the sets' TTL, each counter's window (s), each set's need. Returns {{count, ms to
# live}...}, the day's tokens, the queues' depth, then per set its oldest need + 1 members
# with their scores.
_ADMIT = (
    _COUNT_FN
    + """
local nr, quota, nq = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local gid, now, stale, ttl = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local out = {count(split(1, nr), 1, {unpack(ARGV, 8, 7 + nr)}), false, 0}
local k = nr + 1
if quota == 1 then out[2] = redis.call('GET', KEYS[k]); k = k + 1 end
for i = k, k + nq - 1 do out[3] = out[3] + redis.call('LLEN', KEYS[i]) end
for i = k + nq, #KEYS do
  redis.call('ZADD', KEYS[i], now, gid)
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', stale)  -- nothing runs that long
  redis.call('EXPIRE', KEYS[i], ttl)
  local need = ARGV[7 + nr + i - k - nq + 1]
  out[#out + 1] = redis.call('ZRANGE', KEYS[i], 0, need, 'WITHSCORES')
end
return out
"""
)
# KEYS: the rate counters, the active sets. ARGV: #counters, gid, each counter's window.
_WITHDRAW = (
    _COUNT_FN
    + """
local nr, gid = tonumber(ARGV[1]), ARGV[2]
count(split(1, nr), -1, {unpack(ARGV, 3, 2 + nr)})
for i = nr + 1, #KEYS do redis.call('ZREM', KEYS[i], gid) end
return 0
"""
)


@functools.lru_cache(maxsize=16)
def _rates(setting: str) -> tuple[rate_items.RateLimitItem, ...]:
    """A rate setting ("20/minute;500/day", Flask-Limiter's notation) as its windows."""
    return tuple(rate_items.parse_many(setting)) if setting.strip() else ()


def answer_windows(owner: str, address: str) -> list[RateWindow]:
    """The answers' rate limits, for the account and for the address."""
    cfg = current_app.config
    if not cfg.get("RATELIMIT_ENABLED", True):
        return []
    keys: RedisKeys = current_app.extensions["redis_keys"]
    windows = []
    for who, setting, per in (("acct:" + owner, "RATE_LIMIT_MESSAGES", "account"),
                              ("ip:" + address, "RATE_LIMIT_MESSAGES_IP", "address")):  # fmt: skip
        for item in _rates(cfg[setting]):
            seconds = item.get_expiry()
            key = keys.rate("answers", who, seconds)
            windows.append(RateWindow(key, item.amount, seconds, f"{item} per {per}"))
    return windows


def _run(bus: Any, source: str, keys: list[str], args: list[Any]) -> Any:
    """One of admission's scripts, on the server of the app-wide keys (redis-py's Script
    loads it again if the server lost it: a restart)."""
    script = current_app.extensions["admission_scripts"][source]
    try:
        return script(keys=keys, args=args, client=bus.app_client())
    except redis.RedisError:
        bus.refresh_nodes()  # on a cluster, the shard may have failed over or moved
        raise


@dataclass
class Admission:
    """An answer's count in its rate windows, and its place among its account's and
    address's active answers."""

    gid: str
    priority: int
    keys: list[str] = field(default_factory=list)
    windows: list[RateWindow] = field(default_factory=list)

    def withdraw(self) -> None:
        """It was not started after all (refused, or the request failed): free its place
        and give back its count."""
        keys = [w.key for w in self.windows] + self.keys
        args = [len(self.windows), self.gid, *(w.seconds for w in self.windows)]
        try:
            _run(current_app.extensions["stream_bus"], _WITHDRAW, keys, args)
        except redis.RedisError:
            log.warning("could not withdraw %s from the active answers", self.gid)


def admit(gid: str) -> Admission:
    """Admit a new answer or raise 429: rates, quota, backlog, then the concurrency caps.

    One script call does everything at once (counts the answer in its rate windows, reads
    the day's tokens and the queue's depth, and joins every active set, reading its oldest
    members): one round trip, and less than half the client CPU of the same commands in
    a pipeline. A second round trip reads the state of the other answers found there, if
    any; a third drops those that are over, if any. A refused answer gives back everything
    it took.
    """
    cfg = current_app.config
    owner, address = accounts.current_owner(), accounts.client_address()
    keys: RedisKeys = current_app.extensions["redis_keys"]
    bus = current_app.extensions["stream_bus"]
    quota, backlog = int(cfg["DAILY_TOKENS"]), int(cfg["MAX_QUEUED"])
    # The account's set is kept even with no cap: its count is the answer's priority.
    account_cap = int(cfg["MAX_ACTIVE_ANSWERS"])
    caps = [(keys.active("acct:" + owner), account_cap, max(account_cap, PRIORITY_LEVELS - 1))]
    address_cap = int(cfg["MAX_ACTIVE_ANSWERS_IP"])
    if address_cap:
        caps.append((keys.active("ip:" + address), address_cap, address_cap))
    windows = answer_windows(owner, address)
    admission = Admission(gid, 0, [key for key, _, _ in caps], windows)
    now = time.time()
    horizon = float(cfg["QUEUE_TIMEOUT"]) + float(cfg["ANSWER_DEADLINE"])
    queues = queue_names(keys.celery_queue(cfg["CELERY_QUEUE"])) if backlog else []
    replies = _run(
        bus, _ADMIT,
        [w.key for w in windows] + ([_day_key(owner)] if quota else []) + queues
        + [key for key, _, _ in caps],
        [len(windows), 1 if quota else 0, len(queues), gid, repr(now), repr(now - horizon),
         int(horizon) + 60, *(w.seconds for w in windows), *(need for _, _, need in caps)],
    )  # fmt: skip
    counted, tokens, depth, *members = replies
    try:
        _refuse_over_rate(windows, counted)
        if quota:
            _refuse_over_quota(quota, int(tokens or 0))
        if backlog:
            _refuse_backlog(backlog, depth)
    except ApiError:
        admission.withdraw()
        raise
    chunks = [list(zip(flat[::2], map(float, flat[1::2]), strict=True)) for flat in members]
    counts = _count_active(bus, gid, caps, chunks, now)
    for (_, cap, _), count in zip(caps, counts, strict=True):
        if cap and count > cap:
            admission.withdraw()
            raise rejected(
                "too_many_answers",
                f"At most {cap} answers may run at once; wait for one to finish.",
                5,
            )
    admission.priority = min(counts[0] - 1, PRIORITY_LEVELS - 1)
    return admission


def _count_active(
    bus: Any, gid: str, caps: list[tuple[str, int, int]], chunks: list[list], now: float
) -> list[int]:
    """Per active set, how many answers other than ``gid`` are not over, up to its
    ``need`` (all the caller needs to know: so a busy set costs no more than a small
    one), plus one (``gid``); drops the members found over. ``chunks``: each set's
    oldest ``need + 1`` members, as read when ``gid`` joined it."""
    members = {m.decode() for chunk in chunks for m, _ in chunk} - {gid}
    states = dict(zip(members, bus.states(list(members)), strict=True)) if members else {}
    counts, over_by_key = [], {}
    for (key, _, need), chunk in zip(caps, chunks, strict=True):
        others = [(m.decode(), score) for m, score in chunk if m.decode() != gid]
        over = [m for m, score in others if _is_over(states[m][0].get("state"), now - score)]
        active = len(others) - len(over)
        if over:
            over_by_key[key] = over
        if active < need and len(chunk) > need:  # more members than read: read on
            if over:
                bus.redis.zrem(key, *over_by_key.pop(key))
            active += _join_active(key, gid, need - active, start=len(chunk) - len(over)) - 1
        counts.append(min(active, need) + 1)
    if over_by_key:
        with bus.redis.pipeline(transaction=False) as pipe:
            for key, over in over_by_key.items():
                pipe.zrem(key, *over)
            pipe.execute()
    return counts


def _join_active(key: str, gid: str, need: int, start: int = 0) -> int:
    """Count the members of an active set other than ``gid`` that are not over, oldest
    first from rank ``start``, up to ``need``; drops the members found over. The count
    includes ``gid``."""
    bus = current_app.extensions["stream_bus"]
    r = bus.redis
    now = time.time()
    active = 0
    while active < need:
        chunk = r.zrange(key, start, start + need, withscores=True)
        if not chunk:
            break
        others = [(m.decode(), score) for m, score in chunk if m.decode() != gid]
        states = bus.states([m for m, _ in others]) if others else []
        over = [
            m
            for (m, score), (meta, _) in zip(others, states, strict=True)
            if _is_over(meta.get("state"), now - score)
        ]
        if over:
            r.zrem(key, *over)
        active += len(others) - len(over)
        start += len(chunk) - len(over)  # the dropped ones no longer hold a rank
    return min(active, need) + 1


def _refuse_over_rate(windows: list[RateWindow], counted: list[int]) -> None:
    """Refuse an answer past any of its rate limits, until the last of those windows ends.
    ``counted``: each window's count and milliseconds to live, as the script returns."""
    over = [(w, ttl) for w, count, ttl in zip(windows, counted[::2], counted[1::2], strict=True)
            if count > w.amount]  # fmt: skip
    if not over:
        return
    window, ttl_ms = max(over, key=lambda pair: pair[1])
    retry_after = max(1, math.ceil(ttl_ms / 1000))
    error = rejected(
        "rate_limited",
        f"Too many answers started: at most {window.label}. Try again in {retry_after} s.",
        retry_after,
    )
    error.headers.update(_rate_headers(window.amount, 0, time.time() + ttl_ms / 1000))
    raise error


def _is_over(state: str | None, age: float) -> bool:
    if state is None:  # not created yet (or expired long ago)
        return age > _ADMIT_GRACE_S
    return state not in ("queued", "running")


def _refuse_backlog(limit: int, depth: int) -> None:
    """Refuse new answers while too many wait for a worker, app-wide."""
    if depth >= limit:
        raise rejected(
            "server_busy", "Too many answers are waiting; try again in a little while.", 10
        )


def queue_depth(app: Flask) -> int:
    """Tasks waiting in the Celery queue (all its priority levels)."""
    keys: RedisKeys = app.extensions["redis_keys"]
    queue = keys.celery_queue(app.config["CELERY_QUEUE"])
    r = app.extensions["stream_bus"].redis
    with r.pipeline(transaction=False) as pipe:
        for name in queue_names(queue):
            pipe.llen(name)
        return sum(pipe.execute())


def queue_names(queue: str) -> list[str]:
    """kombu's Redis list per priority level (its default separator, see config.finalize)."""
    return [queue] + [f"{queue}{_KOMBU_SEP}{level}" for level in range(1, PRIORITY_LEVELS)]


# --- daily tokens ---------------------------------------------------------------------


def _today() -> datetime:
    return datetime.now(UTC)


def _day_key(owner: str, app: Flask | None = None) -> str:
    keys: RedisKeys = (app or current_app).extensions["redis_keys"]
    return keys.tokens(owner, _today().strftime("%Y%m%d"))


def _refuse_over_quota(quota: int, used: int) -> None:
    """Refuse new answers once the account has used its tokens for the day."""
    if used >= quota:
        now = _today()
        midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        raise rejected(
            "quota_exceeded",
            f"This account has used its {quota:,} tokens for today; more at 00:00 UTC.",
            int((midnight - now).total_seconds()) + 1,
        )


def tokens_today(owner: str) -> int:
    value = current_app.extensions["stream_bus"].redis.get(_day_key(owner))
    return int(value or 0)


def count_tokens(app: Flask, owner: str, tokens: int) -> None:
    """Add an answer's tokens to its account's day (kept two days, then gone)."""
    if tokens <= 0:
        return
    key = _day_key(owner, app)
    with app.extensions["stream_bus"].redis.pipeline(transaction=False) as pipe:
        pipe.incrby(key, tokens)
        pipe.expire(key, 2 * 86400)
        pipe.execute()


# --- open event streams ---------------------------------------------------------------


class StreamSlots:
    """Open event streams per account and address, counted app-wide in Redis.

    Each stream holds a member in its account's and its address's sorted set, scored by
    when it expires. This process renews all of its own in one pipeline every half
    minute, so a process that dies frees its slots within ``_STREAM_TTL_S``.
    """

    def __init__(self, r: redis.Redis, keys: RedisKeys) -> None:
        self.redis, self.keys = r, keys
        self._mine: dict[str, list[str]] = {}  # member -> its keys
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    def open(self, caps: list[tuple[str, int]]) -> Callable[[], None]:
        """Take a slot under each (who, cap), or raise 429; returns its release."""
        caps = [(who, cap) for who, cap in caps if cap > 0]
        if not caps:  # nothing to count (and no Redis round trip per stream)
            return lambda: None
        member = uuid.uuid4().hex
        keys = [self.keys.streams(who) for who, _ in caps]
        now = time.time()
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.zremrangebyscore(key, "-inf", now)
                pipe.zadd(key, {member: now + _STREAM_TTL_S})
                pipe.expire(key, _STREAM_TTL_S)
                pipe.zcard(key)
            counts = pipe.execute()[3::4]
        for (_, cap), count in zip(caps, counts, strict=True):
            if count > cap:
                self._drop(member, keys)
                raise rejected("too_many_streams", f"At most {cap} streams may be open at once.", 5)
        with self._lock:
            self._mine[member] = keys
            self._start_renewer()
        return lambda: self._close(member)

    def _close(self, member: str) -> None:
        with self._lock:
            keys = self._mine.pop(member, None)
        if keys:
            self._drop(member, keys)

    def _drop(self, member: str, keys: list[str]) -> None:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.zrem(key, member)
                pipe.execute()
        except redis.RedisError:
            log.info("could not free a stream slot; it expires by itself")

    def _start_renewer(self) -> None:
        if self._renewer is None or not self._renewer.is_alive():
            self._renewer = threading.Thread(target=self._renew_forever, daemon=True)
            self._renewer.start()

    def _renew_forever(self) -> None:
        while True:
            time.sleep(_STREAM_RENEW_S)
            try:
                self.renew()
            except redis.RedisError:
                log.warning("could not renew open stream slots", exc_info=True)

    def renew(self) -> None:
        with self._lock:
            mine = list(self._mine.items())
        expires = time.time() + _STREAM_TTL_S
        with self.redis.pipeline(transaction=False) as pipe:
            for member, keys in mine:
                for key in keys:
                    pipe.zadd(key, {member: expires}, xx=True)
                    pipe.expire(key, _STREAM_TTL_S)
            pipe.execute()


def open_stream(door: str) -> Callable[[], None]:
    """A slot for one more event stream of this request's account and address; returns
    its release (call it once the stream is over)."""
    cfg = current_app.config
    slots: StreamSlots = current_app.extensions["stream_slots"]
    release = slots.open(
        [
            ("acct:" + accounts.current_owner(), int(cfg["MAX_STREAMS"])),
            ("ip:" + accounts.client_address(), int(cfg["MAX_STREAMS_IP"])),
        ]
    )
    gauge = metrics.OPEN_STREAMS.labels(door)
    gauge.inc()
    done = threading.Event()

    def close() -> None:
        if not done.is_set():
            done.set()
            gauge.dec()
            release()

    return close


def used_tokens(usage: dict[str, Any] | None, prompt: str, answer: str) -> int:
    """An answer's tokens: the backend's count, else an estimate from the text."""
    if usage:
        total = usage.get("total_tokens")
        if isinstance(total, int) and total > 0:
            return total
        parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
        if all(isinstance(p, int) for p in parts):
            return sum(parts)
    return policy.estimate_tokens(prompt) + policy.estimate_tokens(answer)
