"""API errors: every failure under /api answers JSON {"error": {"code", "message"}}."""

from __future__ import annotations

import logging

import kombu.exceptions
import redis
import sqlalchemy.exc
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from tidechat import metrics

log = logging.getLogger(__name__)

# Redis (streams, the task queue) or the database cannot be reached right now.
REDIS_DOWN = (redis.RedisError, kombu.exceptions.OperationalError)
DATABASE_DOWN = (
    sqlalchemy.exc.OperationalError,  # refused, lost, timed out, locked
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,  # no pooled connection came free
)
RETRY_AFTER_S = 5


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after: int | None = None,
        param: str | None = None,  # the request field at fault (OpenAI's errors name it)
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after, self.param = retry_after, param
        self.headers: dict[str, str] = {}  # more response headers (a rate limit's)


def not_found(what: str = "resource") -> ApiError:
    return ApiError(404, "not_found", f"No such {what}.")


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def unavailable(what: str) -> ApiError:
    (metrics.REDIS_ERRORS if what == "Redis" else metrics.DATABASE_ERRORS).inc()
    return ApiError(
        503, "unavailable", f"The service cannot reach its {what} right now; try again shortly."
    )


def database_unavailable(exc: Exception) -> ApiError:
    """A failed database call as its client sees it. Every pooled connection in use until
    ``DATABASE_POOL_TIMEOUT`` (a burst) is "busy", not "cannot reach"."""
    if isinstance(exc, sqlalchemy.exc.TimeoutError):
        metrics.DATABASE_ERRORS.inc()
        return ApiError(503, "busy", "The service is busy right now; try again in a moment.")
    return unavailable("database")


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        response = jsonify(error_body(exc.code, exc.message))
        if exc.retry_after is not None or exc.status == 503:
            response.headers["Retry-After"] = str(exc.retry_after or RETRY_AFTER_S)
        response.headers.update(exc.headers)
        return response, exc.status

    def _redis_down(exc: Exception):
        log.warning("%s %s: Redis unavailable: %s", request.method, request.path, exc)
        return _api_error(unavailable("Redis"))

    def _database_down(exc: Exception):
        log.warning("%s %s: database unavailable: %s", request.method, request.path, exc)
        return _api_error(database_unavailable(exc))

    for exc_class in REDIS_DOWN:
        app.register_error_handler(exc_class, _redis_down)
    for exc_class in DATABASE_DOWN:
        app.register_error_handler(exc_class, _database_down)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if not request.path.startswith("/api/"):
            return exc
        code = _HTTP_CODES.get(exc.code or 500, "http_error")
        response = jsonify(error_body(code, exc.description or exc.name))
        response.status_code = exc.code or 500
        if exc.code == 405 and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response
