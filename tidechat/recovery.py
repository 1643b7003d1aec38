"""Ending answers that nobody else will end: their worker died, Redis lost their state, or
their task vanished. The hub (for streams someone watches) and the sweeper (for every
unfinished answer in the database, watched or not) both decide here.

A worker cut off from Redis for a moment (an outage, a restart from disk, a paused
server) loses its lease keys but takes them back at its next renewal. So a generation
is only ended as ``worker_lost`` when its lease is still gone ``grace`` after it was
first seen gone.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy.orm import Session

from tidechat import chat, lifecycle, models
from tidechat.stream_bus import ERROR, STATE_LOST, WORKER_LOST, StreamBus, lost_end

log = logging.getLogger(__name__)


class Sightings:
    """When each suspect generation was first seen so; ``due`` once it has been for
    ``grace`` seconds."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._first: dict[str, float] = {}

    def due(self, gid: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return now - self._first.setdefault(gid, now) >= self.grace

    def clear(self, gid: str) -> None:
        self._first.pop(gid, None)

    def keep(self, gids: set[str]) -> None:
        """Forget every generation but these (no longer suspect)."""
        for gid in set(self._first) - gids:
            del self._first[gid]


def reap(s: Session, bus: StreamBus, gid: str) -> bool:
    """End a running generation whose worker is gone, and record it.

    If the worker stored the answer's end in the database but could not end the stream
    (Redis refused it), the stream ends as stored; otherwise with ``worker_lost``.
    """
    msg = chat.generation_message(s, gid)
    if msg is not None and msg.status in models.FINAL_STATUSES:
        event, payload = chat.terminal_of(msg)
        return bool(bus.reap(gid, payload, event, msg.status))
    if not bus.reap(gid, WORKER_LOST):
        return False
    log.warning("generation %s: its worker is gone; ended with worker_lost", gid)
    lifecycle.finished(gid, status=models.ERROR, error_code=WORKER_LOST["code"])
    if msg is not None:
        chat.reconcile(s, bus, msg)
    return True


def end_lost(s: Session, bus: StreamBus, msg: models.Message) -> bool:
    """Redis lost this generation's state: end its open streams and the message."""
    if not bus.end_lost(msg.generation_id, ERROR, lost_end(msg.content), models.ERROR):
        return False
    log.warning("generation %s: Redis lost its state; ended with state_lost", msg.generation_id)
    lifecycle.finished(msg.generation_id, status=models.ERROR, error_code=STATE_LOST["code"])
    chat.record_end(s, msg, msg.content, models.ERROR, STATE_LOST)
    return True
