"""Tidechat's Celery app for the benchmark worker: the real one, plus a ready line.

At ``--loglevel WARNING`` (no per-task log lines to slow the worker) Celery does not log
"ready.", so this prints its own line when the worker starts consuming.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery.signals import worker_ready

READY_LINE = "bench worker ready"


@worker_ready.connect
def _announce(**_kwargs: Any) -> None:
    import worker  # where the worker's code came from: an A/B run needs it from its checkout

    print(f"{READY_LINE}: code from {Path(worker.__file__).resolve().parent.parent}", flush=True)


def __getattr__(name: str) -> Any:
    """Load the real app lazily, so importing READY_LINE does not build a Flask app."""
    if name in ("celery_app", "app", "celery", "flask_app"):
        from worker import celery_app as real

        return getattr(real, "celery_app" if name != "flask_app" else "flask_app")
    raise AttributeError(name)
