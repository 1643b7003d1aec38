"""Which models the configured backend offers, and how to name that backend on the page."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from flask import Flask

log = logging.getLogger(__name__)
CACHE_SECONDS = 60.0
# A failed listing is retried sooner: llama.cpp's server, for one, answers /v1/models only
# between answers, so a look-up during a long answer times out.
RETRY_SECONDS = 5.0

_lock = threading.Lock()
_CACHE = "tidechat.model_catalog"  # app.extensions key: (fetched at, models)


def backend_label(config: dict[str, Any]) -> str:
    """A name for the model server fit for the page: never a key, never a URL's userinfo."""
    if config.get("BACKEND_LABEL"):
        return str(config["BACKEND_LABEL"])
    base = config.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    parts = urlsplit(base)
    host = parts.hostname or "unknown"
    return f"{host}:{parts.port}" if parts.port else host


def available_models(app: Flask) -> list[str]:
    """The backend's /v1/models, cached briefly; just the default if it cannot be listed."""
    now = time.monotonic()
    with _lock:
        cached = app.extensions.get(_CACHE)
        if cached and now - cached[0] < (CACHE_SECONDS if cached[1] else RETRY_SECONDS):
            return cached[1]
    from worker.model_client import make_client  # only this route needs the SDK

    try:
        client = make_client({**app.config, "OPENAI_TIMEOUT": 3, "OPENAI_MAX_RETRIES": 0})
        models = sorted(m.id for m in client.models.list())
    except Exception as exc:  # the backend may not list models at all
        log.info("could not list models: %s", exc)
        models = []
    with _lock:
        app.extensions[_CACHE] = (now, models)
    return models


def model_catalog(app: Flask) -> dict[str, Any]:
    default = app.config["DEFAULT_MODEL"]
    models = available_models(app)
    if default not in models:
        models = [default, *models]
    return {"default": default, "models": models, "backend": backend_label(app.config)}
