"""Every Redis key Tidechat uses, and nothing else: change the layout here only.

Per generation ``<gid>``:
- ``<p>gen:<gid>:stream``  the Redis Stream of events (delta, done, error);
- ``<p>gen:<gid>:meta``    hash: ``state`` (queued|running|done|error|cancelled) and
                           ``terminal_id`` (the stream id of the done/error entry);
- ``<p>gen:<gid>:lease``   exists while a worker holds the generation (TTL, renewed);
- ``<p>gen:<gid>:cancel``  set when the owner asks to stop.
Channels:
- ``<p>cancel``            pub/sub: a generation id, published when its owner asks to stop.
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

    def hub_wake(self, hub_id: str) -> str:
        return f"{self.prefix}hub:{hub_id}:wake"
