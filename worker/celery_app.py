"""The worker's entry point: ``celery -A worker.celery_app worker -P gevent``."""

import contextlib
import logging
import os
import sys
from typing import Any

from celery.apps import worker as celery_worker
from celery.signals import (
    celeryd_after_setup,
    setup_logging,
    task_postrun,
    task_prerun,
    worker_ready,
    worker_shutting_down,
)

from app import create_app
from tidechat import error_reporting, gc_freeze, logs, sweeper
from worker import GENERATE_TASK, tasks

log = logging.getLogger(__name__)

# LOG_FORMAT=json: JSON lines from here on, Celery's own included (its setup_logging signal,
# below, keeps it from installing handlers of its own).
if logs.json_enabled():
    logs.configure_json("worker")
error_reporting.init("worker")  # SENTRY_DSN: before Celery builds the task tracers it wraps

flask_app = create_app()
celery_app = flask_app.extensions["celery"]


@worker_ready.connect
def _ready(**_: object) -> None:
    sweeper.start(flask_app)
    gc_freeze.freeze_startup_objects()


@worker_shutting_down.connect
def _drain(**_: object) -> None:
    """SIGTERM (a deploy, a restart): Celery stops taking tasks and waits for the running
    ones; answers still running after ``DRAIN_SECONDS`` are handed on to another worker."""
    tasks.hand_off_after(flask_app, float(flask_app.config["DRAIN_SECONDS"]))


@task_prerun.connect
def _bind_ids(task: Any = None, args: Any = None, **_: object) -> None:
    """The task's lines name the request that queued it and the generation it runs."""
    gid = args[0] if task is not None and task.name == GENERATE_TASK and args else None
    logs.bind_task(task.request if task is not None else None, gid)


@task_postrun.connect
def _unbind_ids(**_: object) -> None:
    logs.unbind_task()


if logs.json_enabled():
    logs.log_greenlet_errors()

    def _say(message: str, f: Any = sys.__stderr__) -> None:
        """Celery's notices from its signal handlers (``worker: Warm shutdown``), which it
        writes as plain text: a JSON line, written the same careful way."""
        line = logs.one_line("worker", "celery.apps.worker", logging.WARNING, message.strip())
        write = getattr(celery_worker, "_original_os_write", os.write)  # not gevent's
        with contextlib.suppress(OSError, AttributeError, ValueError):
            write(f.fileno(), line)

    celery_worker.safe_say = _say

    @setup_logging.connect
    def _json_logs(loglevel: Any = None, **_: object) -> None:
        logs.configure_json("worker", loglevel)

    @celeryd_after_setup.connect
    def _one_line_banner(sender: str, instance: Any, **_: object) -> None:
        """Celery's start-up banner is plain text on stdout: one JSON line instead."""
        instance.quiet = True
        queues = ",".join(sorted(instance.app.amqp.queues))
        log.info(
            "celery worker %s starting", sender,
            extra={"concurrency": instance.concurrency, "queues": queues},
        )  # fmt: skip
