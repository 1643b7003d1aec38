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
_REFRESHING = "tidechat.model_catalog.refreshing"
_CLIENT = "tidechat.model_catalog.client"  # one client (and connection pool) per process


def available_models(app: Flask, fresh: bool = False) -> list[str]:
    """The backend's /v1/models, cached briefly (``fresh``: asked again now); the last
    listing that worked while it cannot be listed, or none.

    One request at a time asks the backend (per process); the others meanwhile get the
    list as it was. Without that, every request that came as the cache expired built a
    client and asked again: under a burst that was most of the web process's CPU.
    """
    now = time.monotonic()
    with _lock:
        cached = app.extensions.get(_CACHE)
        ttl = CACHE_SECONDS if cached and cached[2] else RETRY_SECONDS
        if cached and ((not fresh and now - cached[0] < ttl) or _refreshing(app)):
            return cached[1]
        app.extensions[_REFRESHING] = True
    try:
        models, ok = _list(app), True
    except Exception as exc:  # the backend may not list models at all
        log.info("could not list models: %s", exc)
        models, ok = (cached[1] if cached else []), False
    finally:
        with _lock:
            app.extensions[_REFRESHING] = False
    with _lock:
        app.extensions[_CACHE] = (now, models, ok)
    return models


def _refreshing(app: Flask) -> bool:
    return bool(app.extensions.get(_REFRESHING))


def _list(app: Flask) -> list[str]:
    base_url, client = app.extensions.get(_CLIENT, (None, None))
    if client is None or base_url != app.config["OPENAI_BASE_URL"]:
        from worker.model_client import make_client  # only this needs the SDK

        config = {**app.config, "OPENAI_TIMEOUT": 3, "OPENAI_MAX_RETRIES": 0}
        client = make_client(config)
        app.extensions[_CLIENT] = (app.config["OPENAI_BASE_URL"], client)
    return sorted(m.id for m in client.models.list())
