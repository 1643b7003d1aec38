"""Retry a step that talks to Redis or the database, with back-off, for a bounded time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


def retrying(
    step: Callable[[], T], errors: tuple[type[BaseException], ...], seconds: float, what: str
) -> T:
    """``step()``, again after each of ``errors`` until ``seconds`` have passed (then the
    last error is raised). Waits 0.1 s, doubling to 2 s, between tries."""
    deadline, pause = time.monotonic() + seconds, 0.1
    while True:
        try:
            return step()
        except errors as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("%s failed (%s); retrying in %.1f s", what, exc, pause)
            time.sleep(pause)
            pause = min(pause * 2, 2.0)
