"""Which models the configured backend offers (its ``/v1/models``), cached briefly.

What the page may use of them is :mod:`tidechat.policy`'s to say."""

from __future__ import annotations

import logging
import threading
import time

from flask import Flask

log = logging.getLogger(__name__)
CACHE_SECONDS = 60.0
# A failed listing is retried sooner: llama.cpp's server, for one, answers /v1/models only
# between answers, so a look-up during a long answer times out.
RETRY_SECONDS = 5.0

_lock = threading.Lock()
_CACHE = "tidechat.model_catalog"  # app.extensions key: (fetched at, models, listed ok)


def available_models(app: Flask, fresh: bool = False) -> list[str]:
    """The backend's /v1/models, cached briefly (``fresh``: asked again now); the last
    listing that worked while it cannot be listed, or none."""
    now = time.monotonic()
    with _lock:
        cached = app.extensions.get(_CACHE)
        ttl = CACHE_SECONDS if cached and cached[2] else RETRY_SECONDS
        if not fresh and cached and now - cached[0] < ttl:
            return cached[1]
    from worker.model_client import make_client  # only this route needs the SDK

    try:
        client = make_client({**app.config, "OPENAI_TIMEOUT": 3, "OPENAI_MAX_RETRIES": 0})
        models = sorted(m.id for m in client.models.list())
    except Exception as exc:  # the backend may not list models at all
        log.info("could not list models: %s", exc)
        with _lock:
            last = app.extensions.get(_CACHE)
            models = last[1] if last else []
            app.extensions[_CACHE] = (now, models, False)
        return models
    with _lock:
        app.extensions[_CACHE] = (now, models, True)
    return models
