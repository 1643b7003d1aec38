"""Accounts: sign-up, sign-in, revocable sessions, auth modes, invitations, the admin role."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.stack import ROOT, start_web
from tidechat import db

PASSWORD = "correct horse battery"
HTTPS = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}


@pytest.fixture
def fresh_app(make_app, tmp_path):
    """An app on a database of its own (the first account there becomes the admin)."""

    def make(**env: str):
        url = f"sqlite:///{tmp_path / uuid.uuid4().hex}.db"
        db.upgrade(url)
        return make_app(DATABASE_URL=url, **env)

    return make


def email() -> str:
    return f"user-{uuid.uuid4().hex[:10]}@example.com"


def sign_up(client, address: str | None = None, **extra):
    return client.post(
        "/api/auth/signup", json={"email": address or email(), "password": PASSWORD, **extra}
    )


def log_in(client, address: str, password: str = PASSWORD):
    return client.post("/api/auth/login", json={"email": address, "password": password})


def code_of(response) -> str:
    return response.get_json()["error"]["code"]


def titles(client) -> list[str]:
    return [c["title"] for c in client.get("/api/conversations").get_json()["conversations"]]


def new_chat(client, title: str) -> str:
    cid = client.post("/api/conversations").get_json()["id"]
    assert client.patch(f"/api/conversations/{cid}", json={"title": title}).status_code == 200
    return cid


def test_a_guest_who_signs_up_keeps_their_chats_and_signs_in_elsewhere(make_app):
    app = make_app()
    guest = app.test_client()
    new_chat(guest, "made as a guest")
    address = email()
    response = sign_up(guest, address)
    assert response.status_code == 201
    assert response.get_json()["user"]["email"] == address
    assert titles(guest) == ["made as a guest"]

    laptop = app.test_client()  # another browser: a stranger until it signs in
    assert titles(laptop) == []
    assert log_in(laptop, address).status_code == 200
    assert titles(laptop) == ["made as a guest"]

    assert guest.post("/api/auth/logout").status_code == 204
    assert guest.get("/api/auth/me").get_json()["user"] is None
    assert titles(guest) == []  # a new guest, not the account's owner id


def test_wrong_password_and_unknown_email_get_the_same_answer(make_app):
    client = make_app().test_client()
    address = email()
    sign_up(client, address)
    other = make_app().test_client()
    for response in (log_in(other, address, "wrong password!"), log_in(other, email())):
        assert response.status_code == 401
        assert response.get_json()["error"] == {
            "code": "invalid_credentials",
            "message": "Wrong email or password.",
        }
    assert other.get("/api/auth/me").get_json()["user"] is None


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"email": "not-an-address", "password": PASSWORD}, "invalid_email"),
        ({"email": "a@example.com", "password": "short"}, "weak_password"),
        ({"email": "a@example.com", "password": 12345678901}, "weak_password"),
        ({"email": ["a@example.com"], "password": PASSWORD}, "invalid_email"),
    ],
)
def test_bad_sign_ups_are_400(make_app, body, code):
    response = make_app().test_client().post("/api/auth/signup", json=body)
    assert response.status_code == 400
    assert code_of(response) == code


def test_an_email_signs_up_once(make_app):
    app = make_app()
    address = email()
    assert sign_up(app.test_client(), address).status_code == 201
    response = sign_up(app.test_client(), address.upper())
    assert response.status_code == 409
    assert code_of(response) == "email_taken"


def test_passwords_and_session_tokens_are_stored_hashed(fresh_app):
    app = fresh_app()
    client = app.test_client()
    sign_up(client)
    engine = create_engine(app.config["DATABASE_URL"])
    with engine.connect() as conn:
        hashed = conn.execute(text("select password_hash from users")).scalar_one()
        token_hash = conn.execute(text("select token_hash from auth_sessions")).scalar_one()
    assert hashed.startswith("$argon2id$") and PASSWORD not in hashed
    cookie = client.get_cookie("session")
    assert token_hash not in cookie.value


def test_open_mode_answers_401_until_signed_in(make_app):
    client = make_app(TIDECHAT_AUTH_MODE="open").test_client()
    for method, path in [
        ("GET", "/api/conversations"),
        ("POST", "/api/conversations"),
        ("GET", "/api/models"),
        ("GET", "/api/generations/abc/events"),
    ]:
        response = client.open(path, method=method)
        assert response.status_code == 401, path
        assert code_of(response) == "login_required"
    me = client.get("/api/auth/me").get_json()
    assert me["user"] is None and me["mode"] == "open" and me["can_sign_up"] is True
    assert client.get("/").status_code == 200  # the page itself: its sign-in screen
    assert client.get_cookie("session") is None  # and no guest identity
    assert sign_up(client).status_code == 201
    assert client.get("/api/conversations").status_code == 200


def test_signing_out_revokes_the_session_even_for_a_copied_cookie(make_app):
    app = make_app(TIDECHAT_AUTH_MODE="open")
    client = app.test_client()
    sign_up(client)
    stolen = client.get_cookie("session").value
    thief = app.test_client()
    thief.set_cookie("session", stolen)
    assert thief.get("/api/conversations").status_code == 200
    assert client.post("/api/auth/logout").status_code == 204
    assert client.get("/api/conversations").status_code == 401
    assert thief.get("/api/conversations").status_code == 401


def test_sign_out_everywhere_ends_every_device(make_app):
    app = make_app(TIDECHAT_AUTH_MODE="open")
    phone, laptop = app.test_client(), app.test_client()
    address = email()
    sign_up(phone, address)
    log_in(laptop, address)
    assert laptop.get("/api/conversations").status_code == 200
    assert phone.post("/api/auth/logout", json={"everywhere": True}).status_code == 204
    assert laptop.get("/api/conversations").status_code == 401
    assert phone.get("/api/conversations").status_code == 401
    assert log_in(laptop, address).status_code == 200  # the account itself is fine


def test_invite_mode_takes_sign_ups_with_a_code_once(fresh_app):
    admin_email = email()
    app = fresh_app(TIDECHAT_AUTH_MODE="invite", TIDECHAT_ADMIN_EMAILS=admin_email)
    stranger = app.test_client()
    response = sign_up(stranger)
    assert response.status_code == 403 and code_of(response) == "invite_required"
    assert code_of(sign_up(stranger, invite="made-up")) == "invite_required"

    admin = app.test_client()
    assert sign_up(admin, admin_email).status_code == 201  # the configured admin needs none
    assert admin.get("/api/auth/me").get_json()["user"]["admin"] is True
    invite = admin.post("/api/admin/invites").get_json()
    assert invite["url"].endswith("/?invite=" + invite["code"])
    assert sign_up(stranger, invite=invite["code"]).status_code == 201
    late = app.test_client()
    assert code_of(sign_up(late, invite=invite["code"])) == "invite_required"


def test_the_invite_command_prints_a_working_code(fresh_app, settings, tmp_path):
    app = fresh_app(TIDECHAT_AUTH_MODE="invite")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TIDECHAT_")},
        **settings,
        "DATABASE_URL": app.config["DATABASE_URL"],
        "TIDECHAT_AUTH_MODE": "invite",
    }
    out = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "invite"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    code = out.stdout.strip().splitlines()[-1]
    assert sign_up(app.test_client(), invite=code).status_code == 201


def test_the_first_account_is_the_admin_and_can_disable_a_user(fresh_app):
    app = fresh_app(TIDECHAT_AUTH_MODE="open")
    admin, user, users_laptop = app.test_client(), app.test_client(), app.test_client()
    sign_up(admin)
    address = email()
    sign_up(user, address)
    log_in(users_laptop, address)
    new_chat(user, "mine")
    assert user.get("/api/auth/me").get_json()["user"]["admin"] is False
    assert user.get("/api/admin/users").status_code == 404  # not even advertised

    listed = admin.get("/api/admin/users").get_json()["users"]
    row = next(u for u in listed if u["email"] == address)
    assert row["conversations"] == 1 and row["disabled"] is False
    response = admin.patch(f"/api/admin/users/{row['id']}", json={"disabled": True})
    assert response.status_code == 200 and response.get_json()["disabled"] is True

    for client in (user, users_laptop):
        assert client.get("/api/conversations").status_code == 401
    response = log_in(user, address)
    assert response.status_code == 403 and code_of(response) == "account_disabled"
    admin.patch(f"/api/admin/users/{row['id']}", json={"disabled": False})
    assert log_in(user, address).status_code == 200
    assert titles(user) == ["mine"]


def test_an_admin_cannot_disable_themselves(fresh_app):
    admin = fresh_app().test_client()
    me = sign_up(admin).get_json()["user"]
    response = admin.patch(f"/api/admin/users/{me['id']}", json={"disabled": True})
    assert response.status_code == 400


def test_the_app_refuses_to_start_without_secret_key_in_open_mode(settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDECHAT_")}
    env.update(settings, SECRET_KEY="", TIDECHAT_AUTH_MODE="open")
    out = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "routes"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0
    assert "SECRET_KEY must be set" in out.stderr


def test_a_rotated_secret_key_keeps_sessions_through_its_fallback(make_app):
    old = make_app(SECRET_KEY="the-old-key", TIDECHAT_AUTH_MODE="open")
    client = old.test_client()
    sign_up(client)
    cookie = client.get_cookie("session").value

    def with_cookie(app):
        c = app.test_client()
        c.set_cookie("session", cookie)
        return c.get("/api/conversations").status_code

    rotated = make_app(
        SECRET_KEY="the-new-key", TIDECHAT_SECRET_KEY_FALLBACKS='["the-old-key"]',
        TIDECHAT_AUTH_MODE="open",
    )  # fmt: skip
    assert with_cookie(rotated) == 200
    without = make_app(
        SECRET_KEY="the-new-key", TIDECHAT_SECRET_KEY_FALLBACKS="[]", TIDECHAT_AUTH_MODE="open"
    )
    assert with_cookie(without) == 401


def test_over_https_the_cookie_is_secure_and_host_prefixed(make_app):
    client = make_app(TIDECHAT_TRUSTED_PROXIES="1").test_client()
    response = client.post(
        "/api/auth/signup", json={"email": email(), "password": PASSWORD}, headers=HTTPS
    )
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("__Host-session=")
    for part in ("Secure", "HttpOnly", "Path=/", "SameSite=Lax"):
        assert part in cookie
    assert "Domain" not in cookie
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    me = client.get("/api/auth/me", headers=HTTPS).get_json()
    assert me["user"] is not None  # the prefixed cookie is the one read back


@pytest.mark.e2e
def test_a_second_web_process_with_the_same_key_serves_the_same_user(process_env, workdir, worker):
    env = {**process_env, "TIDECHAT_AUTH_MODE": "open"}
    one = start_web(env, workdir, "web-accounts-1")
    two = start_web(env, workdir, "web-accounts-2")
    try:
        address = email()
        with httpx.Client(base_url=one.url) as first:
            assert sign_up(first, address).status_code == 201
            cid = first.post("/api/conversations").json()["id"]
            cookies = dict(first.cookies)
        with httpx.Client(base_url=two.url, cookies=cookies) as second:
            assert second.get(f"/api/conversations/{cid}").status_code == 200
            assert second.get("/api/auth/me").json()["user"]["email"] == address
    finally:
        one.stop()
        two.stop()
