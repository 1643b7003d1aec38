"""Leases and cancels for every generation a worker process is running, in one place.

A worker holds a lease (a Redis key with a TTL) on each generation it runs; readers end a
generation whose lease stays gone with ``worker_lost``. A lease that Redis lost while the
worker was cut off (an outage, a restart from disk) is taken back at the next renewal, as
long as the generation is still this worker's (its fence). One keeper per process renews all its
leases in a single pipelined round trip per ``LEASE_RENEW`` (a script call per hash slot and
200 leases), and hears cancels at once on a pub/sub channel. The cancel flag itself is
re-read at each renewal, so a missed message costs at most one interval: no poll loop.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from tidechat import redis_conn
from tidechat.stream_bus import StreamBus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deadlines:
    answer: float  # seconds for the whole answer
    token: float  # seconds without a token: a model that sends only keep-alives is stuck


class Lease:
    """One running generation, as its task sees it: stopped by a cancel, a lost lease or
    a missed deadline.

    Each also closes the model stream, so a model that has gone quiet is hung up on at
    once instead of at its next token.
    """

    def __init__(self, gid: str, fence: int = 0, deadlines: Deadlines | None = None) -> None:
        self.gid, self.fence = gid, fence
        self.cancelled = threading.Event()
        self.lost = threading.Event()  # no longer ours: reaped, ended or taken by another
        self.gone = threading.Event()  # Redis lost the generation's state altogether
        self.timed_out = threading.Event()
        self.handed_off = threading.Event()  # this worker is stopping: pass the answer on
        self.deadlines = deadlines
        self.started = self.last_token = time.monotonic()
        self._stream: Any = None
        # Whether any of the events above is set: read once per token, so a plain flag
        # (each is set only through interrupt()).
        self.interrupted = False

    def token(self) -> None:
        self.last_token = time.monotonic()

    def overdue(self, now: float) -> str | None:
        """Which deadline has passed, if one has."""
        if self.deadlines is None:
            return None
        if now - self.started > self.deadlines.answer:
            return f"The answer took longer than {self.deadlines.answer:g} s."
        if now - self.last_token > self.deadlines.token:
            return f"The model sent no text for {self.deadlines.token:g} s."
        return None

    def attach(self, stream: Any) -> None:
        self._stream = stream
        if self.interrupted:
            self._hang_up()

    def interrupt(self, event: threading.Event) -> None:
        if not event.is_set():
            event.set()
            self.interrupted = True
            self._hang_up()

    def _hang_up(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except Exception:
                log.debug("closing the model stream raised", exc_info=True)


class LeaseKeeper:
    def __init__(
        self,
        redis_url: str,
        bus: StreamBus,
        lease_ttl: float,
        renew_every: float,
        deadlines: Deadlines | None = None,
    ) -> None:
        self.bus = bus
        self.deadlines = deadlines
        self.lease_ms = int(lease_ttl * 1000)
        self.renew_every = renew_every
        self._pubsub_client = redis_conn.client(redis_url, socket_timeout=None)
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._handoff_at: float | None = None
        self._served_at = time.monotonic()  # the last turn of its loop (or its creation)

    def hold(self, gid: str, fence: int) -> Lease:
        lease = Lease(gid, fence, self.deadlines)
        with self._lock:
            self._leases[gid] = lease
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
                self._thread.start()
        return lease

    def release(self, lease: Lease) -> None:
        with self._lock:
            self._leases.pop(lease.gid, None)

    def hand_off_after(self, seconds: float) -> None:
        """This worker is stopping: answers still running in ``seconds`` are passed on."""
        self._handoff_at = time.monotonic() + seconds
        log.warning("draining: answers still running in %g s will be handed on", seconds)

    @property
    def draining(self) -> bool:
        return self._handoff_at is not None

    @property
    def healthy(self) -> bool:
        """Not started (no answer yet), or running and going round its loop."""
        if self._thread is None:
            return True
        stalled = time.monotonic() - self._served_at > max(10 * self.renew_every, 10.0)
        return self._thread.is_alive() and not stalled

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._leases)

    def _run(self) -> None:
        while True:
            try:
                self._serve()
            except redis.ConnectionError as exc:
                log.warning("lease keeper lost Redis (%s); retrying", exc)
                time.sleep(0.5)
            except Exception:
                log.exception("lease keeper failed; restarting")
                time.sleep(0.5)

    def _serve(self) -> None:
        pubsub = self._pubsub_client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.bus.keys.cancel_channel())
        try:
            next_renewal = time.monotonic()
            while True:
                self._served_at = time.monotonic()
                wait = max(0.0, next_renewal - time.monotonic())
                message = pubsub.get_message(timeout=wait)
                if message is not None:
                    self._on_cancel(message["data"].decode())
                if time.monotonic() >= next_renewal:
                    self._renew_all()
                    next_renewal = time.monotonic() + self.renew_every
        finally:
            pubsub.close()

    def _on_cancel(self, gid: str) -> None:
        with self._lock:
            lease = self._leases.get(gid)
        if lease is not None:
            lease.interrupt(lease.cancelled)

    def _renew_all(self) -> None:
        with self._lock:
            leases = list(self._leases.values())
        if not leases:
            return
        now = time.monotonic()
        for lease in leases:  # before Redis: deadlines hold while Redis is down too
            if lease.overdue(now):
                lease.interrupt(lease.timed_out)
            if self._handoff_at is not None and now >= self._handoff_at:
                lease.interrupt(lease.handed_off)
        held = [(le.gid, le.fence) for le in leases]
        for lease, (state, cancel) in zip(
            leases, self.bus.renew_and_check(held, self.lease_ms), strict=True
        ):
            if cancel:
                lease.interrupt(lease.cancelled)
            if state == 0:
                lease.interrupt(lease.lost)
            elif state < 0:
                lease.interrupt(lease.gone)
