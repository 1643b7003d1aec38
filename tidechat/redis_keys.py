"""Every Redis key Tidechat uses, and nothing else: change the layout here only.

Per generation ``<gid>``:
- ``<p>gen:<gid>:stream``  the Redis Stream of events (delta, done, error);
- ``<p>gen:<gid>:meta``    hash: ``state`` (queued|running|done|error|cancelled|interrupted),
                           ``terminal_id`` (the stream id of the done/error entry),
                           ``fence`` (claims so far: the running worker's fencing token),
                           ``seq`` (the last delta batch appended, for exactly-once appends),
                           ``queued_at``/``started_at`` (ms), ``handoffs``,
                           ``active`` (the active sets it joined, one per line: its
                           end leaves them);
- ``<p>gen:<gid>:lease``   the fence of the worker holding it (TTL, renewed);
- ``<p>gen:<gid>:cancel``  set when the owner asks to stop.
Per bucket of generations (one on a single server):
- ``<p>hub:moved``         a capped stream: the stream key of each append or end, so a hub
                           watching many streams reads only those that moved.
Channels:
- ``<p>cancel``            pub/sub: a generation id, published when its owner asks to stop.
Process-wide:
- ``<p>sweeper``           the lock of the one process that sweeps at a time;
- ``<p>workers``           sorted set: worker process ids by their last heartbeat;
- ``<p>worker:<id>``       hash: that worker's last heartbeat (TTL 3 intervals);
- ``<p>metrics``           hash: the app-wide metrics (tidechat/metrics.py).
Per account or client address ``<who>`` (``acct:<owner>`` or ``ip:<address>``), for limits:
- ``<p>active:<who>``      sorted set: its answers not yet over (generation ids; an
                           answer leaves it as it ends, or is dropped once found over);
- ``<p>streams:<who>``     sorted set: its open event streams, scored by when they expire;
- ``<p>tokens:<owner>:<YYYYMMDD>``  tokens an account used that UTC day;
- ``<p>rate:<scope>:<who>:<seconds>``  a rate limit's count in its current window
                           (``answers``: the answers started; it expires as the window ends).
Flask-Limiter's rate-limit counters (every other write, sign-ins) live under ``<p>ratelimit``.
Per web process ``<hub>``:
- ``<p>hub:<hub>:wake``    a tiny stream the process writes to interrupt its own XREAD.
Celery's broker keys live under ``<p>celery:`` (kombu's ``global_keyprefix``).

On a Redis Cluster (``buckets`` > 0) a multi-key command or script must keep to one hash
slot, so the names carry hash tags:
- each generation's keys carry its bucket's tag ``{b<n>}`` (n = CRC32 of the id modulo
  ``buckets``): its scripts touch one slot, and the streams of one bucket can be read by one
  multi-key ``XREAD`` (the hub runs one reader per bucket; the bucket's moved stream
  and each web process's hub wake streams carry the same tags);
- every app-wide key (the ``<p>`` names above that are not per generation, and Celery's)
  carries the tag ``{<p>}``: they sit together on one shard, so losing another shard
  only touches the answers whose buckets it served.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationKeys:
    stream: str
    meta: str
    lease: str
    cancel: str
    moved: str  # its bucket's moved stream (see above)


@dataclass(frozen=True)
class RedisKeys:
    prefix: str
    buckets: int = 0  # hash-tag buckets of generations on a Redis Cluster; 0: one server

    def __post_init__(self) -> None:
        # App-wide names: one hash tag for all of them on a cluster (see above).
        object.__setattr__(self, "_app", f"{{{self.prefix}}}" if self.buckets else self.prefix)

    @property
    def clustered(self) -> bool:
        return self.buckets > 0

    def bucket(self, gid: str) -> int:
        """The hash-tag bucket of a generation (always 0 on one server)."""
        return zlib.crc32(gid.encode()) % self.buckets if self.buckets else 0

    def _tag(self, bucket: int) -> str:
        return f"{{b{bucket}}}:" if self.buckets else ""

    def generation(self, gid: str) -> GenerationKeys:
        bucket = self.bucket(gid)
        base = f"{self.prefix}gen:{self._tag(bucket)}{gid}:"
        return GenerationKeys(
            stream=base + "stream",
            meta=base + "meta",
            lease=base + "lease",
            cancel=base + "cancel",
            moved=self.moved(bucket),
        )

    def moved(self, bucket: int = 0) -> str:
        return f"{self.prefix}hub:{self._tag(bucket)}moved"

    def cancel_channel(self) -> str:
        return f"{self._app}cancel"

    def sweeper_lock(self) -> str:
        return f"{self._app}sweeper"

    def hub_wake(self, hub_id: str, bucket: int = 0) -> str:
        return f"{self.prefix}hub:{self._tag(bucket)}{hub_id}:wake"

    def active(self, who: str) -> str:
        return f"{self._app}active:{who}"

    def streams(self, who: str) -> str:
        return f"{self._app}streams:{who}"

    def tokens(self, owner: str, day: str) -> str:
        return f"{self._app}tokens:{owner}:{day}"

    def rate(self, scope: str, who: str, seconds: int) -> str:
        return f"{self._app}rate:{scope}:{who}:{seconds}"

    def celery_prefix(self) -> str:
        """kombu's ``global_keyprefix``: every broker key starts with it."""
        return f"{self._app}celery:"

    def celery_queue(self, queue: str) -> str:
        return f"{self._app}celery:{queue}"

    def workers(self) -> str:
        return f"{self._app}workers"

    def worker(self, worker_id: str) -> str:
        return f"{self._app}worker:{worker_id}"

    def metrics(self) -> str:
        return f"{self._app}metrics"
