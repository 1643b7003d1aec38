"""Rate limits per identity (Flask-Limiter, counters in the same Redis)."""

from __future__ import annotations

from flask import Flask
from flask_limiter import Limiter

from tidechat.identity import current_owner

limiter = Limiter(key_func=current_owner, default_limits=[])


def init_app(app: Flask) -> None:
    app.config.setdefault("RATELIMIT_STORAGE_URI", app.config["REDIS_URL"])
    app.config.setdefault("RATELIMIT_KEY_PREFIX", app.config["KEY_PREFIX"] + "ratelimit")
    app.config.setdefault("RATELIMIT_HEADERS_ENABLED", True)
    # While its Redis is down, count in this process's memory instead of failing requests.
    app.config.setdefault("RATELIMIT_IN_MEMORY_FALLBACK_ENABLED", True)
    app.config.setdefault("RATELIMIT_SWALLOW_ERRORS", True)
    limiter.init_app(app)


def message_limit() -> str:
    """The limit on starting answers, read per request so each app can set its own."""
    from flask import current_app

    return current_app.config["RATE_LIMIT_MESSAGES"]
