"""Every Redis key Tidechat uses, and nothing else: change the layout here only.

Per generation ``<gid>``:
- ``<p>gen:<gid>:stream``  the Redis Stream of events (delta, done, error);
- ``<p>gen:<gid>:meta``    hash: ``state`` (queued|running|done|error|cancelled|interrupted),
                           ``terminal_id`` (the stream id of the done/error entry),
                           ``fence`` (claims so far: the running worker's fencing token),
                           ``seq`` (the last delta batch appended, for exactly-once appends),
                           ``queued_at``/``started_at`` (ms), ``handoffs``;
- ``<p>gen:<gid>:lease``   the fence of the worker holding it (TTL, renewed);
- ``<p>gen:<gid>:cancel``  set when the owner asks to stop.
Channels:
- ``<p>cancel``            pub/sub: a generation id, published when its owner asks to stop.
Process-wide:
- ``<p>sweeper``           the lock of the one process that sweeps at a time;
- ``<p>workers``           sorted set: worker process ids by their last heartbeat;
- ``<p>worker:<id>``       hash: that worker's last heartbeat (TTL 3 intervals);
- ``<p>metrics``           hash: the app-wide metrics (tidechat/metrics.py).
Per account or client address ``<who>`` (``acct:<owner>`` or ``ip:<address>``), for limits:
- ``<p>active:<who>``      sorted set: its answers not yet over (generation ids);
- ``<p>streams:<who>``     sorted set: its open event streams, scored by when they expire;
- ``<p>tokens:<owner>:<YYYYMMDD>``  tokens an account used that UTC day.
Flask-Limiter's rate-limit counters live under ``<p>ratelimit``.
Per web process ``<hub>``:
- ``<p>hub:<hub>:wake``    a tiny stream the process writes to interrupt its own XREAD.
Celery's broker keys live under ``<p>celery:`` (kombu's ``global_keyprefix``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationKeys:
    stream: str
    meta: str
    lease: str
    cancel: str


@dataclass(frozen=True)
class RedisKeys:
    prefix: str

    def generation(self, gid: str) -> GenerationKeys:
        base = f"{self.prefix}gen:{gid}:"
        return GenerationKeys(
            stream=base + "stream",
            meta=base + "meta",
            lease=base + "lease",
            cancel=base + "cancel",
        )

    def cancel_channel(self) -> str:
        return f"{self.prefix}cancel"

    def sweeper_lock(self) -> str:
        return f"{self.prefix}sweeper"

    def hub_wake(self, hub_id: str) -> str:
        return f"{self.prefix}hub:{hub_id}:wake"

    def active(self, who: str) -> str:
        return f"{self.prefix}active:{who}"

    def streams(self, who: str) -> str:
        return f"{self.prefix}streams:{who}"

    def tokens(self, owner: str, day: str) -> str:
        return f"{self.prefix}tokens:{owner}:{day}"

    def celery_queue(self, queue: str) -> str:
        return f"{self.prefix}celery:{queue}"

    def workers(self) -> str:
        return f"{self.prefix}workers"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    def metrics(self) -> str:
        return f"{self.prefix}metrics"
