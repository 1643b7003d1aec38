"""gunicorn settings for the web process (``gunicorn -c gunicorn.conf.py 'app:create_app()'``)."""

# gevent must patch the standard library before anything else imports it.
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import tempfile  # noqa: E402

# Metrics of every worker process, in one directory (prometheus_client's multiprocess
# mode): set before the app, and so prometheus_client, is imported in any worker.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="tidechat-metrics-")

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

# LOG_FORMAT=json: one JSON object per line on stderr, gunicorn's own lines and (with
# ACCESS_LOG set) its access lines included, like the app's (tidechat/logs.py).
from tidechat import logs  # noqa: E402

if logs.json_enabled():
    logconfig_dict = logs.dict_config("web", loglevel, accesslog)
    access_log_format = "%(m)s %(U)s %(s)s %(M)sms"  # the message; the facts are fields
    logs.log_greenlet_errors()


def post_worker_init(worker) -> None:
    """At SIGTERM (a deploy, a restart) end every open SSE stream at once, so its client
    reconnects with its cursor to a process that stays, instead of stalling until
    ``graceful_timeout`` cuts it. Start error reports (SENTRY_DSN) in this process, and
    keep what it built at startup out of the garbage collector's full collections."""
    import signal

    import gevent

    from tidechat import error_reporting
    from tidechat.views.hub import drain

    error_reporting.init("web")
    from tidechat import gc_freeze, sweeper

    # The bench's baselines (bench/proxy.py, bench/bare_relay.py) run with this file too:
    # they have no streams to drain and nothing to sweep.
    if "stream_bus" in worker.wsgi.extensions:
        stop = worker.handle_exit

        def handle_exit(sig, frame) -> None:
            stop(sig, frame)
            gevent.spawn(drain, worker.wsgi)

        signal.signal(signal.SIGTERM, handle_exit)
        sweeper.start(worker.wsgi)  # every process offers to sweep; one at a time does
    gc_freeze.freeze_startup_objects()  # last: after everything startup builds


def on_starting(server) -> None:
    """A fresh start: no counts left from an earlier run in this directory (only
    prometheus_client's own files are removed)."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))


def child_exit(server, worker) -> None:
    """A worker process is gone: its live gauges (open streams) no longer count."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
