"""gunicorn settings for the web process (``gunicorn -c gunicorn.conf.py 'app:create_app()'``)."""

# gevent must patch the standard library before anything else imports it.
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gevent"
# Every open SSE stream holds one connection; idle clients are cheap greenlets.
worker_connections = int(os.environ.get("WEB_WORKER_CONNECTIONS", "10000"))
timeout = 30
graceful_timeout = 10
keepalive = 5
preload_app = False  # each worker builds its app (and Redis connections) after the fork
accesslog = os.environ.get("ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
# Several servers may run on one host (tests, a second web process): no shared ctl socket.
control_socket_disable = True
