"""Tidechat's shared core: what the web process and the Celery worker both import."""
