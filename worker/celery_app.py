"""The worker's entry point: ``celery -A worker.celery_app worker -P gevent``."""

from celery.signals import worker_ready, worker_shutting_down

from app import create_app
from tidechat import sweeper
from worker import tasks

flask_app = create_app()
celery_app = flask_app.extensions["celery"]


@worker_ready.connect
def _start_sweeper(**_: object) -> None:
    sweeper.start(flask_app)


@worker_shutting_down.connect
def _drain(**_: object) -> None:
    """SIGTERM (a deploy, a restart): Celery stops taking tasks and waits for the running
    ones; answers still running after ``DRAIN_SECONDS`` are handed on to another worker."""
    tasks.hand_off_after(flask_app, float(flask_app.config["DRAIN_SECONDS"]))
