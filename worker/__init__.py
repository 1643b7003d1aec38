"""The Celery side: ``celery_init_app`` binds Celery to the Flask app (Flask's own pattern).

The web process only enqueues by task name, so it never imports the model client.
"""

from __future__ import annotations

from celery import Celery, Task
from flask import Flask

GENERATE_TASK = "tidechat.generate"


def celery_init_app(app: Flask) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask, include=["worker.tasks"])
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    celery_app.flask_app = app  # for worker signals (worker/heartbeat.py)
    app.extensions["celery"] = celery_app
    from worker import heartbeat  # noqa: F401  (connects its worker_ready handler)

    return celery_app


def enqueue_generation(app: Flask, gid: str, priority: int = 0) -> None:
    """Queue a generation; lower ``priority`` goes first (see tidechat/limits.py)."""
    app.extensions["celery"].send_task(GENERATE_TASK, args=[gid], priority=priority)
