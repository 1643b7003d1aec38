"""Error reports to Sentry (or any server that speaks its protocol), when ``SENTRY_DSN`` is set.

Started once per process by its entry point, after any fork: each gunicorn worker
(``post_worker_init`` in gunicorn.conf.py) and the Celery worker (worker/celery_app.py).
It reports unhandled exceptions of requests (Flask integration), failed tasks (Celery
integration), and ERROR log lines (with their exception, if any).

What a report may hold, and what it never does:

- no request body (``max_request_body_size="never"``), no cookies, no user, no client
  address, and sensitive headers (Authorization, Cookie, X-Forwarded-For) filtered
  (``send_default_pii=False``);
- no local variables of the stack frames (``include_local_variables=False``): those hold
  prompts, answers and keys;
- only the integrations named here (no auto-enabled ones: the OpenAI, Redis or HTTP client
  integrations would record what the app sends);
- tags ``request_id`` and ``generation_id`` (see tidechat/logs.py), to find the log lines.

``SENTRY_ENVIRONMENT`` (default ``production``) and ``SENTRY_RELEASE`` (default: what the
SDK finds, e.g. Heroku's ``HEROKU_SLUG_COMMIT`` or ``SOURCE_VERSION``) label the reports;
``SENTRY_TRACES_SAMPLE_RATE`` (default 0: none) turns on performance traces.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from tidechat import logs

log = logging.getLogger(__name__)


def init(proc: str, environ: Mapping[str, str] | None = None) -> bool:
    """Start reporting if ``SENTRY_DSN`` is set; whether it did."""
    env = os.environ if environ is None else environ
    dsn = (env.get("SENTRY_DSN") or "").strip()
    if not dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.flask import FlaskIntegration

    sentry_sdk.init(
        dsn=dsn,
        environment=env.get("SENTRY_ENVIRONMENT") or None,
        release=env.get("SENTRY_RELEASE") or None,
        integrations=[FlaskIntegration(transaction_style="url"), CeleryIntegration()],
        auto_enabling_integrations=False,
        send_default_pii=False,
        max_request_body_size="never",
        include_local_variables=False,
        traces_sample_rate=float(env.get("SENTRY_TRACES_SAMPLE_RATE") or 0) or None,
        before_send=_tag_ids,
    )
    sentry_sdk.get_global_scope().set_tag("proc", proc)  # web or worker, on every report
    from celery.signals import before_task_publish

    before_task_publish.connect(_propagate_trace, weak=False, dispatch_uid="tidechat-sentry")
    log.info("error reports go to Sentry")
    return True


def _propagate_trace(headers: dict | None = None, **_: Any) -> None:
    """The request's trace, on to the worker's task: a generation is queued without
    ``send_task`` (worker.GenerationQueue), which Sentry's Celery integration wraps to do
    this. Put where that integration puts it: on the message and in its inner ``headers``,
    which the worker's side reads."""
    import sentry_sdk

    if headers is None or "sentry-trace" in headers:  # (send_task's own, already there)
        return
    trace = {"sentry-trace": sentry_sdk.get_traceparent(), "baggage": sentry_sdk.get_baggage()}
    trace = {name: value for name, value in trace.items() if value}
    headers.update(trace)
    headers.setdefault("headers", {}).update(trace)


def _tag_ids(event: dict[str, Any], _hint: dict[str, Any]) -> dict[str, Any]:
    tags = event.setdefault("tags", {})
    request_id, generation_id = logs.REQUEST_ID.get(), logs.GENERATION_ID.get()
    if request_id:
        tags.setdefault("request_id", request_id)
    if generation_id:
        tags.setdefault("generation_id", generation_id)
    return event
