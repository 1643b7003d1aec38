"""A generation's life, one call per step: the place to observe it (logs now; metrics or
traces can be added inside these same functions).

=============  =======  ==================================================================
step           where    called from
=============  =======  ==================================================================
queued         web      tidechat/answers.py, once its task is enqueued
started        worker   worker/tasks.py, once the run has claimed the generation
first token    worker   worker/tasks.py, at the first text delta of the run
finished       both     worker/tasks.py as the run records its end; tidechat/answers.py
                        when a cancel ends an answer no worker holds
=============  =======  ==================================================================

Each step takes the facts as arguments and logs one line at INFO (WARNING for a failed
end), with an ``event`` field (``generation.queued``, ...) and the facts as fields, so the
lines can be searched and counted. What these lines never hold: message or answer text,
the model server's key, cookies, or anything else a user typed. A handed-on answer (a
deploy) has a ``started`` in each worker that runs it, and one ``finished``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tidechat import logs

log = logging.getLogger(__name__)

QUEUED = "generation.queued"
STARTED = "generation.started"
FIRST_TOKEN = "generation.first_token"
FINISHED = "generation.finished"


def queued(gid: str, *, model: str, priority: int = 0) -> None:
    """Web: the answer is stored and its task is in the queue. The rest of this request's
    lines name the generation too."""
    logs.bind_generation(gid)
    log.info(
        "generation %s queued", gid,
        extra={"event": QUEUED, "generation_id": gid, "model": model, "priority": priority},
    )  # fmt: skip


def started(gid: str, *, model: str, handed_on: bool = False) -> float:
    """Worker: this run claimed the generation (``handed_on``: it continues an answer
    another worker began). Returns the start time, for :func:`ms_since`."""
    log.info(
        "generation %s started%s", gid, " (handed on)" if handed_on else "",
        extra={"event": STARTED, "generation_id": gid, "model": model, "handed_on": handed_on},
    )  # fmt: skip
    return time.monotonic()


def first_token(gid: str, *, ms: float) -> None:
    """Worker: the first text of this run arrived, ``ms`` after it started."""
    log.info(
        "generation %s first token after %.0f ms", gid, ms,
        extra={"event": FIRST_TOKEN, "generation_id": gid, "ms": round(ms, 1)},
    )  # fmt: skip


def finished(
    gid: str,
    *,
    status: str,
    error_code: str | None = None,
    tokens: int | None = None,
    ms: float | None = None,
) -> None:
    """The answer's end is recorded: its final ``status`` (done, error, cancelled,
    interrupted), the error's code, the output tokens the model server reported (None
    when it reports none), and how long the run took (None where no run was timed)."""
    fields: dict[str, Any] = {
        "event": FINISHED,
        "generation_id": gid,
        "status": status,
        "error_code": error_code,
        "tokens": tokens,
        "duration_ms": None if ms is None else round(ms, 1),
    }
    text = f"generation {gid} finished: {status}"
    if error_code:
        text += f" ({error_code})"
    if ms is not None:
        text += f" in {ms:.0f} ms"
    log.log(logging.WARNING if error_code else logging.INFO, text, extra=fields)


def ms_since(started_at: float) -> float:
    return (time.monotonic() - started_at) * 1000


def end_facts(payload: dict | None) -> dict[str, Any]:
    """``error_code`` and ``tokens`` of a stream's end payload, for :func:`finished`."""
    payload = payload or {}
    usage = payload.get("usage") or {}
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    code = payload.get("code")
    return {
        "error_code": code if isinstance(code, str) else None,
        "tokens": tokens if isinstance(tokens, int) else None,
    }
