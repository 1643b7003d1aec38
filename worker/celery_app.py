"""The worker's entry point: ``celery -A worker.celery_app worker -P gevent``."""

from app import create_app

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
