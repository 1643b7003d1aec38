"""The HTTP surface's defences for a public URL: proxy handling, HTTPS, CSRF, headers.

- **Behind a proxy** (``TRUSTED_PROXIES`` > 0; Heroku's router is one): werkzeug's
  ``ProxyFix`` takes the client's address and scheme from that many
  ``X-Forwarded-*`` hops, so ``request.is_secure`` is true behind an HTTPS front end. Never
  set it higher than the number of proxies really in front: a client could then forge them.
- **HTTPS**: on a secure request the session cookie is ``Secure`` (decided per request by
  :class:`SessionInterface`, as one process may see both) and responses carry HSTS. With
  ``FORCE_HTTPS``, plain-HTTP GET/HEAD are redirected (308) and other methods refused.
- **CSRF, in depth** (the cookie's SameSite=Lax does not stop a *same-site* page): an unsafe
  method is refused (403 ``cross_site``) when the browser says, by ``Sec-Fetch-Site``, that
  another site sent it, or, from browsers without that header, when its ``Origin`` is not
  this server's own. Requests with neither header (curl, server-side SDKs) are no browser's
  and pass. And an unsafe ``/api`` request with a body must send JSON (415 otherwise):
  a cross-site HTML form can post only form, multipart or text bodies.
- **Slow bodies**: a request body must arrive within ``BODY_TIMEOUT`` seconds (408
  otherwise), so a client that trickles one cannot hold a connection forever.
- **Headers on every response** (the API, the event stream, static files, error pages):
  ``nosniff``, ``Referrer-Policy``, ``X-Frame-Options``, and ``Cache-Control: no-store`` on
  ``/api`` responses that set no caching of their own (the event stream keeps its
  ``no-cache, no-transform``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Request, Response, has_request_context, jsonify, redirect, request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface, SessionMixin
from itsdangerous import BadSignature, URLSafeTimedSerializer
from werkzeug.middleware.proxy_fix import ProxyFix

from tidechat.errors import error_body

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Sec-Fetch-Site values of a request this server's own page (or the user, by typing the
# URL or a bookmark) made; "same-site" is a sibling subdomain, which SameSite=Lax trusts.
ALLOWED_FETCH_SITES = frozenset({"same-origin", "none"})
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
HSTS = "max-age=31536000; includeSubDomains"
API_PREFIX = "/api/"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_FALSE = {"", "0", "false", "no", "off"}
_TRUE = {"1", "true", "yes", "on"}
# A session cookie that did not change is signed again (its expiry moved on) once it is this
# old, not on every response: signing it cost about 0.2 ms of each POST.
SESSION_REFRESH_AFTER = timedelta(days=1)


class SessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, ``Secure`` and ``__Host-`` over HTTPS, their expiry
    moved on at most once a day (``SESSION_REFRESH_AFTER``) while they are used.

    ``SESSION_COOKIE_SECURE`` is one value for the whole app; this decides per request
    (from ``request.is_secure``, after ProxyFix), without changing shared config.
    """

    def __init__(self) -> None:
        self._serializer: tuple[tuple[Any, ...], URLSafeTimedSerializer | None] | None = None

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        # Flask builds a new one per request; it holds no state of a request,
        # so one per set of keys serves them all.
        keys = (app.secret_key, *(app.config["SECRET_KEY_FALLBACKS"] or ()))
        if self._serializer is None or self._serializer[0] != keys:
            self._serializer = (keys, super().get_signing_serializer(app))
        return self._serializer[1]

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        # Flask's own, and it keeps when the cookie was signed.
        serializer = self.get_signing_serializer(app)
        if serializer is None:
            return None
        value = request.cookies.get(self.get_cookie_name(app))
        if not value:
            return self.session_class()
        max_age = int(app.permanent_session_lifetime.total_seconds())
        try:
            data, signed_at = serializer.loads(value, max_age=max_age, return_timestamp=True)
        except BadSignature:
            return self.session_class()
        session = self.session_class(data)
        session.signed_at = signed_at  # type: ignore[attr-defined]
        return session

    def should_set_cookie(self, app: Flask, session: SessionMixin) -> bool:
        if session.modified:
            return True
        if not (session.permanent and app.config["SESSION_REFRESH_EACH_REQUEST"]):
            return False
        signed_at = getattr(session, "signed_at", None)
        return signed_at is None or datetime.now(UTC) - signed_at >= SESSION_REFRESH_AFTER

    def get_cookie_secure(self, app: Flask) -> bool:
        if app.config["SESSION_COOKIE_SECURE"]:
            return True
        return has_request_context() and request.is_secure

    def get_cookie_name(self, app: Flask) -> str:
        # Over HTTPS the cookie is "__Host-" prefixed: browsers then take it only if it is
        # Secure, host-only and for the whole site, so a sibling subdomain cannot plant one.
        name = app.config["SESSION_COOKIE_NAME"]
        if self.get_cookie_secure(app) and not app.config["SESSION_COOKIE_DOMAIN"]:
            return "__Host-" + name
        return name


def init_app(app: Flask) -> None:
    proxies = trusted_proxies(app.config.get("TRUSTED_PROXIES", 0))
    force_https = flag("FORCE_HTTPS", app.config.get("FORCE_HTTPS", False))
    app.config["TRUSTED_PROXIES"], app.config["FORCE_HTTPS"] = proxies, force_https
    if proxies:
        # Not X-Forwarded-Host: Heroku's router keeps the Host header and does not set it,
        # so trusting it would let any client choose the host this app believes it has.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=proxies, x_proto=proxies
        )
    app.session_interface = SessionInterface()
    app.wsgi_app = BodyDeadline(  # type: ignore[method-assign]
        app.wsgi_app, float(app.config["BODY_TIMEOUT"]), int(app.config["MAX_CONTENT_LENGTH"])
    )

    @app.before_request
    def _guard():
        if force_https and not request.is_secure:
            return _to_https()
        # /v1 authenticates by bearer key, never by cookie: no ambient credential to forge
        if request.method in UNSAFE_METHODS and not request.path.startswith("/v1/"):
            if is_cross_site():
                return _error(
                    403, "cross_site", "Cross-site requests are refused; use this site's own page."
                )
            if _needs_json() and has_body() and not request.is_json:
                return _error(
                    415, "unsupported_media_type", "Send JSON (Content-Type: application/json)."
                )
        return None

    @app.after_request
    def _headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.path.startswith(API_PREFIX) and "Cache-Control" not in response.headers:
            response.headers["Cache-Control"] = "no-store"  # private data
        if request.is_secure:
            response.headers.setdefault("Strict-Transport-Security", HSTS)
        return response


def is_cross_site() -> bool:
    """Whether a browser sent this request from another site (or another origin)."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        return fetch_site.strip().lower() not in ALLOWED_FETCH_SITES
    origin = request.headers.get("Origin")
    if origin is None:
        return False  # no browser's request (or one too old to say): SameSite still holds
    theirs = _origin_key(origin)  # "null" (sandboxed, privacy redirects) is never ours
    return theirs is None or theirs != _origin_key(f"{request.scheme}://{request.host}")


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a serialized origin, ports made explicit; None if it is
    not one (``null``, garbage)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in _DEFAULT_PORTS or not host or parts.path not in ("", "/"):
        return None
    return scheme, host, port or _DEFAULT_PORTS[scheme]


def _needs_json() -> bool:
    # Routing failed: its own 404 or 405 says more than a 415 would.
    return request.path.startswith(API_PREFIX) and request.routing_exception is None


def has_body() -> bool:
    """Whether the request came with a body (a chunked one is read to find out)."""
    length = request.content_length
    if length is None:  # chunked (or unsized): look, within MAX_CONTENT_LENGTH
        return bool(request.get_data(cache=True))
    return length > 0


def _to_https():
    if request.method in ("GET", "HEAD"):
        return redirect("https://" + request.url.split("://", 1)[1], code=308)
    return _error(403, "https_required", "This server accepts only HTTPS requests.")


def _error(status: int, code: str, message: str):
    response = jsonify(error_body(code, message))
    response.status_code = status
    return response


def trusted_proxies(value: Any) -> int:
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = -1
    if count < 0 or isinstance(value, bool) or (isinstance(value, float) and value != count):
        raise ValueError(f"TIDECHAT_TRUSTED_PROXIES must be a whole number >= 0, not {value!r}")
    return count


def flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"TIDECHAT_{name} must be true or false, not {value!r}")


class BodyDeadline:
    """WSGI middleware: read a request's body within ``seconds`` before the app sees it.

    Under gevent (gunicorn's worker) a body that trickles in is cut off with 408; without
    gevent (the test client, a debugger) bodies are read as they are.
    """

    def __init__(self, app: Callable, seconds: float, max_bytes: int) -> None:
        self.app, self.seconds, self.max_bytes = app, seconds, max_bytes

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if not (_gevent_patched() and _has_wsgi_body(environ)):
            return self.app(environ, start_response)
        import gevent

        length = environ.get("CONTENT_LENGTH")
        want = int(length) if length and length.isdigit() else None
        if want is not None and want > self.max_bytes:
            return self.app(environ, start_response)  # Flask answers 413 unread
        try:
            with gevent.Timeout(self.seconds):
                body = _read(environ["wsgi.input"], want, self.max_bytes + 1)
        except gevent.Timeout:
            start_response(
                "408 Request Timeout",
                [("Content-Type", "application/json"), ("Connection", "close")],
            )
            message = "The request body did not arrive in time."
            return [json.dumps(error_body("request_timeout", message)).encode()]
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["wsgi.input_terminated"] = True
        return self.app(environ, start_response)


def _gevent_patched() -> bool:
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return False
    return monkey.is_module_patched("socket")


def _has_wsgi_body(environ: dict) -> bool:
    if environ.get("CONTENT_LENGTH") not in (None, "", "0"):
        return True
    return "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()


def _read(stream: Any, want: int | None, cap: int) -> bytes:
    chunks, got = [], 0
    limit = cap if want is None else min(want, cap)
    while got < limit:
        chunk = stream.read(min(65536, limit - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
