"""Logs: plain text by default (``bin/dev``), one JSON object per line with ``LOG_FORMAT=json``.

The format comes from ``TIDECHAT_LOG_FORMAT``, else ``LOG_FORMAT``, else ``text``. In JSON
mode the web process (gunicorn: its error and access lines, through ``logconfig_dict`` in
gunicorn.conf.py) and the worker (Celery's own lines, through its ``setup_logging`` signal
in worker/celery_app.py) write the same objects to stderr::

    {"time": "2025-01-01T12:00:00.000Z", "level": "INFO", "logger": "tidechat.lifecycle",
     "message": "generation 3f... started", "proc": "worker", "pid": 12,
     "request_id": "9b2...", "generation_id": "3f...", "event": "generation.started", ...}

Each line carries the ids of what it is about, from context variables (per greenlet under
gevent, per thread otherwise):

- ``request_id``: the router's ``X-Request-ID`` when it sent a sane one, else a new one;
  echoed back in the response's ``X-Request-ID``. A task queued during a request carries it
  in a message header, so the worker's lines for that answer name the same request.
- ``generation_id``: bound for a request whose URL names a generation (``<gid>``), by
  :func:`tidechat.lifecycle.queued` for the request that starts one, and for the Celery
  task that runs one.

Only scalar ``extra=`` fields are copied into a line, never containers: libraries put
things like task arguments or headers there. And never message text or secrets: see
:mod:`tidechat.lifecycle` for what a generation's lines hold.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
REQUEST_ID_HEADER = "X-Request-ID"
ENVIRON_KEY = "tidechat.request_id"
# A task message header: the request that queued the task (read back in the worker).
TASK_HEADER = "tidechat_request_id"
# What a router's request id may look like (Heroku's: a UUID, or the client's 20-200
# characters); anything else is replaced, so a client cannot write odd things into logs.
_SANE_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,200}")

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tidechat_request_id", default=None
)
GENERATION_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tidechat_generation_id", default=None
)

# Libraries that log request bodies (prompts) at DEBUG: never below INFO, whatever LOG_LEVEL.
_CHATTY_AT_DEBUG = ("openai", "httpcore", "httpx", "httpx2", "urllib3", "sentry_sdk")


def log_format(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    value = (env.get("TIDECHAT_LOG_FORMAT") or env.get("LOG_FORMAT") or "text").strip().lower()
    if value not in FORMATS:
        raise ValueError(f"LOG_FORMAT must be one of {', '.join(FORMATS)}, not {value!r}")
    return value


def json_enabled(environ: Mapping[str, str] | None = None) -> bool:
    return log_format(environ) == "json"


def log_level(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return (env.get("LOG_LEVEL") or "info").strip().upper()


# --- the line ------------------------------------------------------------------------------

# Attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_SCALARS = (str, int, float, bool)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped)."""

    def __init__(self, proc: str = "") -> None:
        super().__init__()
        self.proc = proc

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line: dict[str, Any] = {
            "time": when.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
        }
        if self.proc:
            line["proc"] = self.proc
        line["pid"] = record.process
        request_id, generation_id = REQUEST_ID.get(), GENERATION_ID.get()
        if request_id:
            line["request_id"] = request_id
        if generation_id:
            line["generation_id"] = generation_id
        if record.name == "gunicorn.access" and isinstance(record.args, Mapping):
            line.update(_access_fields(record.args))
        for key, value in record.__dict__.items():
            extra = key not in _STANDARD and not key.startswith("_")
            if extra and (value is None or isinstance(value, _SCALARS)):
                line[key] = value
        if record.exc_info:
            line["exc_type"] = getattr(record.exc_info[0], "__name__", str(record.exc_info[0]))
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a call whose arguments do not fit its format: still one JSON line
        return f"{record.msg} (unformatted: its arguments did not fit)"


def _access_fields(atoms: Mapping[str, Any]) -> dict[str, Any]:
    """The few facts of gunicorn's access atoms worth a field: never the request's headers
    or environ, which the atoms hold in full (cookies, Authorization)."""

    def atom(key: str) -> Any:
        value = atoms.get(key)
        return None if value in (None, "-") else value

    fields = {
        "method": atom("m"),
        "path": atom("U"),
        "status": int(atom("s") or 0) or None,
        "bytes": atom("B"),
        "duration_ms": round(int(atom("D") or 0) / 1000, 1),
    }
    rid = atom("{x-request-id}o")  # ours, echoed on the response: the one that was used
    if isinstance(rid, str) and _SANE_ID.fullmatch(rid):
        fields["request_id"] = rid
    return {k: v for k, v in fields.items() if v is not None}


# --- configuring a process -----------------------------------------------------------------


def dict_config(proc: str, level: str | None = None, access_log: str | None = None) -> dict:
    """A ``logging.config.dictConfig`` for JSON lines on stderr (gunicorn's
    ``logconfig_dict``). ``access_log``: gunicorn's access lines, off unless set; ``-``
    for stderr with the rest, else a file path."""
    level = (level or log_level()).upper()
    handlers: dict[str, dict] = {
        "json": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "stream": "ext://sys.stderr",
        }
    }
    access: dict[str, Any] = {"level": "WARNING", "handlers": [], "propagate": True}
    if access_log:
        access["level"] = "INFO"
        if access_log != "-":
            handlers["access_file"] = {
                "class": "logging.FileHandler",
                "formatter": "json",
                "filename": access_log,
            }
            access.update(handlers=["access_file"], propagate=False)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter", "proc": proc}},
        "handlers": handlers,
        "root": {"level": level, "handlers": ["json"]},
        "loggers": {
            # no level: gunicorn's own (--log-level, else LOG_LEVEL) stands
            "gunicorn.error": {"handlers": [], "propagate": True},
            "gunicorn.access": access,
            **{name: {"level": _at_least_info(level)} for name in _CHATTY_AT_DEBUG},
        },
    }


def configure_json(proc: str, level: str | int | None = None) -> None:
    """Send every logger's records to stderr as JSON lines (the Celery worker's way)."""
    if level is None:
        level = log_level()
    elif isinstance(level, int):
        level = logging.getLevelName(level)
    level = str(level).upper()
    handler = logging.StreamHandler(sys.__stderr__ or sys.stderr)
    handler.setFormatter(JsonFormatter(proc))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in _CHATTY_AT_DEBUG:
        logging.getLogger(name).setLevel(_at_least_info(level))
    # Loggers that were given handlers of their own (Celery's, Flask's default) would
    # print plain lines beside ours: everything goes through the root's one handler.
    for logger in logging.root.manager.loggerDict.values():
        if isinstance(logger, logging.Logger):
            for old in list(logger.handlers):
                logger.removeHandler(old)
            logger.propagate = True
    logging.captureWarnings(True)  # warnings.warn() too, instead of raw stderr text


def log_greenlet_errors() -> None:
    """gevent prints a greenlet's uncaught exception to stderr as plain text: log it instead
    (one JSON line, and an error report). Named by the greenlet's function only: the
    arguments gevent would print could hold anything."""
    from gevent.hub import Hub

    def print_exception(hub: Any, context: Any, kind: Any, value: Any, tb: Any) -> None:
        run = getattr(context, "_run", None)
        where = getattr(run, "__qualname__", None) or type(context).__name__
        logging.getLogger("gevent").error(
            "greenlet %s failed with %s", where, getattr(kind, "__name__", kind),
            exc_info=(kind, value, tb),
        )  # fmt: skip

    Hub.print_exception = print_exception  # type: ignore[method-assign]


def one_line(proc: str, logger: str, level: int, message: str) -> bytes:
    """A JSON line made without the logging module (for code that runs in a signal
    handler, where taking logging's locks could deadlock)."""
    record = logging.LogRecord(logger, level, __file__, 0, message, None, None)
    return (JsonFormatter(proc).format(record) + "\n").encode()


def _at_least_info(level: str) -> str:
    return level if logging.getLevelName(level) >= logging.INFO else "INFO"


# --- binding ids ---------------------------------------------------------------------------


def bind_generation(gid: str | None) -> None:
    """The generation the current request or task is about, from here on."""
    GENERATION_ID.set(gid or None)


def sane_id(value: object) -> str | None:
    return value if isinstance(value, str) and _SANE_ID.fullmatch(value) else None


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIds:
    """WSGI middleware: a request id per request (the router's, or a new one), bound for
    the request's lines and echoed back as ``X-Request-ID``."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        rid = sane_id(environ.get("HTTP_X_REQUEST_ID")) or new_request_id()
        environ[ENVIRON_KEY] = rid
        tokens = (REQUEST_ID.set(rid), GENERATION_ID.set(None))

        def start(status: str, headers: list, exc_info: Any = None) -> Callable:
            headers = [(k, v) for k, v in headers if k.lower() != "x-request-id"]
            headers.append((REQUEST_ID_HEADER, rid))
            return start_response(status, headers, exc_info)

        try:
            body = self.app(environ, start)
        except BaseException:
            _reset(tokens)
            raise
        wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(wrapper, type) and isinstance(body, wrapper):
            _reset(tokens)  # a file sent as is (sendfile): nothing logs while it goes
            return body
        return _Closing(body, tokens)


class _Closing:
    """The response body, iterated as is; the ids are unbound when the server closes it
    (after gunicorn's access line, which so still carries them)."""

    def __init__(self, body: Iterable[bytes], tokens: tuple) -> None:
        self.body, self.tokens = body, tokens

    def __iter__(self):
        return iter(self.body)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            _reset(self.tokens)


def _reset(tokens: tuple) -> None:
    for var, token in zip((REQUEST_ID, GENERATION_ID), tokens, strict=True):
        try:
            var.reset(token)
        except ValueError:  # closed from another context: just unbind
            var.set(None)


def init_app(app: Any) -> None:
    """Request ids for every response, the generation id for routes that name one, and
    the request id passed on to the tasks a request queues."""
    from flask import request

    app.wsgi_app = RequestIds(app.wsgi_app)

    def bind_route_generation() -> None:
        gid = (request.view_args or {}).get("gid")
        if isinstance(gid, str) and len(gid) <= 64:
            bind_generation(gid)

    # First of all before_request functions: a refusal by another is logged with the id.
    app.before_request_funcs.setdefault(None, []).insert(0, bind_route_generation)
    connect_celery_publish()


def connect_celery_publish() -> None:
    from celery.signals import before_task_publish

    before_task_publish.connect(_add_request_header, weak=False, dispatch_uid=TASK_HEADER)


def _add_request_header(headers: dict | None = None, **_: Any) -> None:
    rid = REQUEST_ID.get()
    if rid and headers is not None:
        headers.setdefault(TASK_HEADER, rid)


def bind_task(request: Any, gid: str | None) -> None:
    """In the worker, as a task starts: the ids of the request that queued it and of the
    generation it runs."""
    REQUEST_ID.set(sane_id(getattr(request, TASK_HEADER, None)))
    GENERATION_ID.set(gid or None)


def unbind_task() -> None:
    REQUEST_ID.set(None)
    GENERATION_ID.set(None)
