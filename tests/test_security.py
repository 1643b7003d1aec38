"""A public URL: security headers everywhere, CSRF in depth, HTTPS behind a proxy, the key file.

Most cases run on the Flask test client (``make_app``); the last ones check the headers on
the real gunicorn stack, where the event stream and static files are served for real.
"""

from __future__ import annotations

import os
import stat
import sys
import time

import pytest
from itsdangerous import TimestampSigner

from tests.helpers import new_conversation, read_events, start
from tidechat import config, security

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}
HSTS = "max-age=31536000; includeSubDomains"
# ProxyFix reads these from the peer it trusts; the test client's peer is 127.0.0.1.
# A queue no worker takes from (the session's worker may be running): answers stay queued.
NO_WORKER = {"TIDECHAT_CELERY_QUEUE": "tidechat-security-tests-no-worker"}
HEROKU_HTTPS = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}


def assert_security_headers(headers) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert headers.get(name) == value, (name, dict(headers))


def error_code(response) -> str:
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]["code"]


def session_cookie(response) -> str:
    """The session cookie: ``__Host-session`` over HTTPS (Secure, host-only, path /),
    ``session`` over plain HTTP, where browsers would refuse the prefix."""
    cookies = [
        c for c in response.headers.getlist("Set-Cookie")
        if c.startswith(("session=", "__Host-session="))
    ]  # fmt: skip
    assert len(cookies) == 1, response.headers
    assert cookies[0].startswith("__Host-") == ("; Secure" in cookies[0]), cookies[0]
    return cookies[0]


# --- headers on every response --------------------------------------------------------


def test_headers_on_api_page_static_and_error_responses(make_app):
    app = make_app()
    app.config["PROPAGATE_EXCEPTIONS"] = False  # let the test see the 500 page

    @app.get("/test-boom")
    def boom():
        raise RuntimeError("boom")

    client = app.test_client()
    cid = client.post("/api/conversations").get_json()["id"]
    responses = {
        "api": client.get("/api/conversations"),
        "api_one": client.get(f"/api/conversations/{cid}"),
        "api_created": client.post("/api/conversations"),
        "api_deleted": client.delete(f"/api/conversations/{cid}"),
        "api_404": client.get("/api/conversations/" + "0" * 32),
        "api_405": client.put("/api/conversations"),
        "api_unknown": client.get("/api/nothing-here"),
        "page": client.get("/"),
        "static": client.get("/static/js/api.js"),
        "page_404": client.get("/nothing-here"),
        "500": client.get("/test-boom"),
    }
    expected = {"api_created": 201, "api_deleted": 204, "api_404": 404, "api_405": 405}
    expected |= {"api_unknown": 404, "page_404": 404, "500": 500}
    for name, response in responses.items():
        assert response.status_code == expected.get(name, 200), name
        assert_security_headers(response.headers)
        assert "strict-transport-security" not in response.headers  # plain HTTP
        response.close()
    for name in ("api", "api_one", "api_created", "api_deleted", "api_404", "api_405"):
        assert responses[name].headers["Cache-Control"] == "no-store", name
    assert responses["static"].headers.get("Cache-Control") != "no-store"  # cacheable
    assert "frame-ancestors 'none'" in responses["page"].headers["Content-Security-Policy"]
    assert responses["page"].headers["Cache-Control"] == "no-cache"


# --- CSRF: Sec-Fetch-Site, Origin, JSON bodies ------------------------------------------


def _unsafe_requests(client) -> dict[str, tuple[str, str, dict | None]]:
    """One request of each unsafe kind, on this client's own conversation."""
    cid = new_conversation_of(client)
    return {
        "create": ("POST", "/api/conversations", None),
        "patch": ("PATCH", f"/api/conversations/{cid}", {"title": "renamed"}),
        "cancel": ("POST", "/api/generations/" + "0" * 32 + "/cancel", None),
        "delete": ("DELETE", f"/api/conversations/{cid}", None),
    }


def new_conversation_of(client) -> str:
    response = client.post("/api/conversations")
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()["id"]


@pytest.mark.parametrize("kind", ["create", "patch", "cancel", "delete"])
@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # a sibling subdomain: SameSite=Lax lets it through
        {"Sec-Fetch-Site": "cross-site", "Origin": "http://localhost"},  # Sec-Fetch-Site wins
        {"Origin": "https://evil.example"},
        {"Origin": "http://localhost.evil.example"},
        {"Origin": "http://localhost:8080"},  # another port is another origin
        {"Origin": "https://localhost"},  # another scheme too
        {"Origin": "null"},  # sandboxed frames, privacy-sensitive redirects
        {"Origin": "not a url"},
    ],
    ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items()) if isinstance(h, dict) else h,
)
def test_cross_site_writes_are_403(client, kind, headers):
    method, url, body = _unsafe_requests(client)[kind]
    before = client.get("/api/conversations").get_json()["conversations"]
    response = client.open(url, method=method, json=body, headers=headers)
    assert response.status_code == 403, response.get_data(as_text=True)
    assert error_code(response) == "cross_site"
    assert_security_headers(response.headers)
    assert client.get("/api/conversations").get_json()["conversations"] == before  # untouched


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl, SDKs: no browser, so no cross-site request to fear
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},  # the user's own action (typed URL, bookmark)
        {"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"},
        {"Origin": "http://localhost"},
        {"Origin": "http://LOCALHOST:80"},  # the default port, spelled out
    ],
    ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items()) or "no-headers",
)
def test_same_origin_and_non_browser_writes_pass(client, headers):
    cid = new_conversation_of(client)
    assert client.post("/api/conversations", headers=headers).status_code == 201
    patched = client.patch(f"/api/conversations/{cid}", json={"title": "t"}, headers=headers)
    assert patched.status_code == 200, patched.get_data(as_text=True)
    assert client.delete(f"/api/conversations/{cid}", headers=headers).status_code == 204


def test_safe_methods_are_not_checked(client):
    cid = new_conversation_of(client)
    cross = {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}
    assert client.get(f"/api/conversations/{cid}", headers=cross).status_code == 200
    assert client.get("/", headers=cross).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "content_type"),
    [
        ("POST", "/api/generations/{gid}/cancel", "application/x-www-form-urlencoded"),
        ("POST", "/api/generations/{gid}/cancel", "text/plain"),
        ("POST", "/api/generations/{gid}/cancel", "multipart/form-data; boundary=x"),
        ("POST", "/api/generations/{gid}/continue", "text/plain"),
        ("POST", "/api/conversations/{cid}/regenerate", "application/x-www-form-urlencoded"),
        ("POST", "/api/conversations", "text/plain"),
        ("DELETE", "/api/conversations/{cid}", "text/plain"),
        ("PATCH", "/api/conversations/{cid}", None),
    ],
)
def test_unsafe_api_bodies_must_be_json(make_app, method, path, content_type):
    client = make_app(**NO_WORKER).test_client()
    cid = new_conversation_of(client)
    sent = client.post(f"/api/conversations/{cid}/messages", json={"content": "hi"})
    assert sent.status_code == 202  # no worker takes its queue: it stays queued
    gid = sent.get_json()["generation"]["id"]
    url = path.format(cid=cid, gid=gid)
    response = client.open(url, method=method, data="a=b", content_type=content_type)
    assert response.status_code == 415, response.get_data(as_text=True)
    assert error_code(response) == "unsupported_media_type"
    assert client.get(f"/api/generations/{gid}").get_json()["status"] == "queued"
    assert client.get(f"/api/conversations/{cid}").status_code == 200


def test_unknown_routes_and_methods_say_so_rather_than_415(client):
    wrong_method = client.put("/api/conversations", data="a=b", content_type="text/plain")
    assert wrong_method.status_code == 405 and error_code(wrong_method) == "method_not_allowed"
    nowhere = client.post("/api/nothing-here", data="a=b", content_type="text/plain")
    assert nowhere.status_code == 404 and error_code(nowhere) == "not_found"


def test_bodiless_and_json_writes_still_work(make_app):
    client = make_app(**NO_WORKER).test_client()
    cid = new_conversation_of(client)
    gid = client.post(f"/api/conversations/{cid}/messages", json={"content": "hi"}).get_json()[
        "generation"
    ]["id"]
    assert client.post(f"/api/generations/{gid}/cancel").status_code == 200  # as the page does
    assert client.post(f"/api/generations/{gid}/cancel", json={}).status_code == 200
    assert client.post("/api/conversations", json={}).status_code == 201
    assert client.delete(f"/api/conversations/{cid}", data=b"").status_code == 204


# --- behind a proxy, HTTPS ------------------------------------------------------------


def test_forwarded_https_is_ignored_without_trusted_proxies(client):
    response = client.post("/api/conversations", headers=HEROKU_HTTPS)
    assert response.status_code == 201
    assert "Secure" not in session_cookie(response)
    assert "strict-transport-security" not in response.headers


def test_behind_a_trusted_proxy_https_gives_secure_cookie_and_hsts(make_app):
    app = make_app(TIDECHAT_TRUSTED_PROXIES="1")
    for response in (  # each a new visitor: a cookie is set
        app.test_client().get("/", headers=HEROKU_HTTPS),
        app.test_client().post("/api/conversations", headers=HEROKU_HTTPS),
    ):
        assert response.status_code in (200, 201)
        cookie = session_cookie(response)
        assert "; Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
        assert response.headers["Strict-Transport-Security"] == HSTS
        assert_security_headers(response.headers)
    # The same app, reached over plain HTTP (a health check on the dyno, say): no Secure
    # flag, no HSTS; the setting follows each request, not the last one.
    plain = make_app(TIDECHAT_TRUSTED_PROXIES="1").test_client().post("/api/conversations")
    assert "Secure" not in session_cookie(plain)
    assert "strict-transport-security" not in plain.headers


def test_direct_https_gives_secure_cookie_and_hsts(app):
    response = app.test_client().post("/api/conversations", base_url="https://localhost")
    assert "; Secure" in session_cookie(response)
    assert response.headers["Strict-Transport-Security"] == HSTS


def test_a_session_cookie_is_signed_again_once_a_day_not_on_every_response(client, monkeypatch):
    """A guest's cookie lives ``PERMANENT_SESSION_LIFETIME`` from its last signing; signing
    it on every response cost a fifth of a POST. A day's precision is enough to keep it
    alive while it is used, and a change to the session is always sent at once."""
    assert session_cookie(client.post("/api/conversations"))  # a new guest: signed
    assert "Set-Cookie" not in client.post("/api/conversations").headers  # fresh: as it is
    day_ago = time.time() - security.SESSION_REFRESH_AFTER.total_seconds() - 60
    with monkeypatch.context() as m:  # the cookie as if it were signed a day ago
        m.setattr(TimestampSigner, "get_timestamp", lambda self: int(day_ago))
        serializer = client.application.session_interface.get_signing_serializer(client.application)
        old = serializer.loads(client.get_cookie("session").value)
        client.set_cookie("session", serializer.dumps(old))
    refreshed = client.post("/api/conversations")
    assert refreshed.status_code == 201 and session_cookie(refreshed)
    assert "Set-Cookie" not in client.post("/api/conversations").headers
    assert client.get("/api/conversations").get_json()["conversations"]  # the same guest


def test_proxy_fix_trusts_only_the_configured_hops(make_app):
    app = make_app(TIDECHAT_TRUSTED_PROXIES="1")

    @app.get("/test-whoami")
    def whoami():
        from flask import request

        return {"addr": request.remote_addr, "scheme": request.scheme, "host": request.host}

    seen = (
        app.test_client()
        .get(
            "/test-whoami",
            headers={
                # the client forged the first of each; the router appended the last
                "X-Forwarded-For": "198.51.100.1, 203.0.113.7",
                "X-Forwarded-Proto": "http, https",
                "X-Forwarded-Host": "forged.example, tidechat.example",
            },
        )
        .get_json()
    )
    # X-Forwarded-Host is not trusted: Heroku's router keeps Host and never sets it
    assert seen == {"addr": "203.0.113.7", "scheme": "https", "host": "localhost"}


def test_origin_check_uses_the_forwarded_scheme_and_host(make_app):
    public = {**HEROKU_HTTPS, "Host": "tidechat.example"}
    trusting = make_app(TIDECHAT_TRUSTED_PROXIES="1").test_client()
    ok = trusting.post(
        "/api/conversations", headers={**public, "Origin": "https://tidechat.example"}
    )
    assert ok.status_code == 201
    wrong = trusting.post(
        "/api/conversations", headers={**public, "Origin": "http://tidechat.example"}
    )
    assert wrong.status_code == 403 and error_code(wrong) == "cross_site"
    # Not trusting the proxy, the app sees plain http://localhost: the page's https origin
    # is not its own (set TIDECHAT_TRUSTED_PROXIES=1 on Heroku).
    untrusting = make_app(TIDECHAT_TRUSTED_PROXIES="0").test_client()  # env persists
    refused = untrusting.post(
        "/api/conversations", headers={**public, "Origin": "https://tidechat.example"}
    )
    assert refused.status_code == 403


def test_force_https_redirects_reads_and_refuses_plain_writes(make_app):
    client = make_app(TIDECHAT_FORCE_HTTPS="true", TIDECHAT_TRUSTED_PROXIES="1").test_client()
    for method in ("GET", "HEAD"):
        response = client.open("/some/page?x=1&y=%C3%A9", method=method)
        assert response.status_code == 308
        assert response.headers["Location"] == "https://localhost/some/page?x=1&y=%C3%A9"
        assert_security_headers(response.headers)
        assert "strict-transport-security" not in response.headers
    api = client.get("/api/conversations")
    assert api.status_code == 308
    assert api.headers["Location"] == "https://localhost/api/conversations"
    for method in ("POST", "PATCH", "DELETE", "PUT"):
        response = client.open("/api/conversations", method=method, json={})
        assert response.status_code == 403
        assert error_code(response) == "https_required"
        assert "Set-Cookie" not in response.headers
    secure = client.post("/api/conversations", headers=HEROKU_HTTPS)
    assert secure.status_code == 201
    assert secure.headers["Strict-Transport-Security"] == HSTS
    assert client.get("/", headers=HEROKU_HTTPS).status_code == 200


def test_force_https_is_off_by_default(client):
    assert client.get("/").status_code == 200


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TIDECHAT_TRUSTED_PROXIES", "-1"),
        ("TIDECHAT_TRUSTED_PROXIES", '"many"'),
        ("TIDECHAT_TRUSTED_PROXIES", "1.5"),
        ("TIDECHAT_FORCE_HTTPS", "maybe"),
    ],
)
def test_bad_settings_refuse_to_start(make_app, name, value):
    with pytest.raises(ValueError, match=name):
        make_app(**{name: value})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (1, True),
        ("yes", True),
        ("on", True),
        (False, False),
        (0, False),
        ("off", False),
    ],
)
def test_force_https_flag_values(value, expected):
    assert security.flag("FORCE_HTTPS", value) is expected


# --- the secret-key file --------------------------------------------------------------


@pytest.fixture
def readable_sightings():
    """Every time the process opens, links, chmods or removes a file (audit events), the
    files in the instance dir readable by group or others at that moment."""
    watch: dict = {"dir": None, "seen": [], "busy": False}

    def hook(event: str, args: tuple) -> None:
        if watch["dir"] is None or watch["busy"] or event not in WATCHED_EVENTS:
            return
        watch["busy"] = True
        try:
            for entry in os.scandir(watch["dir"]):
                mode = entry.stat(follow_symlinks=False).st_mode
                if mode & 0o077:
                    watch["seen"].append((event, entry.name, oct(stat.S_IMODE(mode))))
        except FileNotFoundError:
            pass
        finally:
            watch["busy"] = False

    _HOOKS.append(hook)
    yield watch
    watch["dir"] = None
    _HOOKS.remove(hook)


WATCHED_EVENTS = {"open", "os.link", "os.chmod", "os.remove", "os.rename", "os.replace"}
_HOOKS: list = []  # audit hooks can never be removed: one dispatcher, added once


def _dispatch(event: str, args: tuple) -> None:
    for hook in list(_HOOKS):
        hook(event, args)


sys.addaudithook(_dispatch)


def test_secret_key_file_is_never_readable_by_others(tmp_path, monkeypatch, readable_sightings):
    instance = tmp_path / "instance"
    monkeypatch.setattr(config, "INSTANCE_DIR", instance)
    old_umask = os.umask(0o022)  # the usual umask: new files are 0644 unless asked otherwise
    try:
        instance.mkdir(mode=0o700)
        readable_sightings["dir"] = instance
        key = config._instance_secret()
        assert config._instance_secret() == key  # kept: identities survive restarts
    finally:
        os.umask(old_umask)
    readable_sightings["dir"] = None
    assert readable_sightings["seen"] == []
    assert [p.name for p in instance.iterdir()] == ["secret_key"]  # no temporary left
    assert stat.S_IMODE((instance / "secret_key").stat().st_mode) == 0o600
    assert len(key) == 64 and int(key, 16) >= 0


# --- the real stack: gunicorn+gevent, the event stream, static files ----------------------


@pytest.mark.e2e
def test_headers_on_the_real_stack(http, model_server):
    listed = http.get("/api/conversations")
    assert listed.status_code == 200
    assert_security_headers(listed.headers)
    assert listed.headers["cache-control"] == "no-store"

    model = model_server.script(chunks=["hello"])
    _, gen = start(http, model)
    with http.stream("GET", gen["events_url"]) as events:
        assert events.status_code == 200
        assert events.headers["content-type"].startswith("text/event-stream")
        assert_security_headers(events.headers)
        assert events.headers["cache-control"] == "no-cache, no-transform"  # its own
    assert [e.event for e in read_events(http, gen["events_url"])][-1] == "done"

    for path in ("/static/js/api.js", "/static/js/app.js"):
        static = http.get(path)
        assert static.status_code == 200
        assert_security_headers(static.headers)
        assert static.headers.get("cache-control") != "no-store"

    page = http.get("/")
    assert_security_headers(page.headers)
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    missing = http.get("/api/generations/" + "0" * 32 + "/events")
    assert missing.status_code == 404
    assert_security_headers(missing.headers)


@pytest.mark.e2e
def test_csrf_and_json_on_the_real_stack(http, web):
    cid = new_conversation(http)
    cross = http.delete(f"/api/conversations/{cid}", headers={"Sec-Fetch-Site": "same-site"})
    assert cross.status_code == 403 and cross.json()["error"]["code"] == "cross_site"
    foreign = http.post("/api/conversations", headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403
    own = http.post("/api/conversations", headers={"Origin": web.url})
    assert own.status_code == 201

    def chunks():  # a chunked body: no Content-Length to go by
        yield b"a=b"

    chunked = http.post(
        f"/api/conversations/{cid}/regenerate",
        content=chunks(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert chunked.status_code == 415, chunked.text
    assert http.get(f"/api/conversations/{cid}").status_code == 200
