"""Sign-in with OpenID Connect, against a loopback provider (oidc-provider-mock, a real
OpenID provider built on Authlib): discovery, the authorization-code flow, the ID token's
signature and nonce, all over real HTTP."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from urllib.parse import quote, urlsplit

import httpx
import pytest

oidc_provider_mock = pytest.importorskip("oidc_provider_mock")
# The provider (not Tidechat) calls an Authlib API that Authlib now deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:authlib")


@pytest.fixture(scope="module")
def issuer() -> Iterator[str]:
    with oidc_provider_mock.run_server_in_thread() as server:
        yield f"http://localhost:{server.server_port}"


@pytest.fixture
def sso_app(make_app, issuer):
    def make(**env: str):
        return make_app(
            TIDECHAT_OIDC_ISSUER=issuer, TIDECHAT_OIDC_CLIENT_ID="tidechat",
            TIDECHAT_OIDC_CLIENT_SECRET="not-a-real-secret", TIDECHAT_OIDC_LABEL="Example SSO",
            **env,
        )  # fmt: skip

    return make


def provider_user(issuer: str, **claims) -> str:
    subject = f"person-{uuid.uuid4().hex[:8]}"
    response = httpx.put(f"{issuer}/users/{quote(subject)}", json=claims)
    assert response.status_code == 204
    return subject


def sign_in_with_provider(client, subject: str, start: str = "/auth/oidc/login"):
    """The browser's round trip: to the provider, where the person signs in, and back."""
    to_provider = client.get(start)
    assert to_provider.status_code == 302
    approved = httpx.post(to_provider.location, data={"sub": subject})
    assert approved.status_code in (302, 303)
    back = urlsplit(approved.headers["location"])
    return client.get(f"{back.path}?{back.query}")


def test_sign_in_with_the_provider_creates_an_account(sso_app, issuer):
    client = sso_app(TIDECHAT_AUTH_MODE="open").test_client()
    me = client.get("/api/auth/me").get_json()
    assert me["oidc"] == {"label": "Example SSO", "url": "/auth/oidc/login"}
    address = f"sso-{uuid.uuid4().hex[:8]}@example.com"
    subject = provider_user(issuer, email=address, email_verified=True)
    done = sign_in_with_provider(client, subject)
    assert done.status_code == 302 and done.location == "/"
    assert client.get("/api/auth/me").get_json()["user"]["email"] == address
    assert client.get("/api/conversations").status_code == 200


def test_the_same_person_gets_the_same_account_on_another_browser(sso_app, issuer):
    app = sso_app(TIDECHAT_AUTH_MODE="open")
    subject = provider_user(issuer, email=f"sso-{uuid.uuid4().hex[:8]}@example.com")
    first, second = app.test_client(), app.test_client()
    sign_in_with_provider(first, subject)
    cid = first.post("/api/conversations").get_json()["id"]
    sign_in_with_provider(second, subject)
    assert [c["id"] for c in second.get("/api/conversations").get_json()["conversations"]] == [cid]


def test_a_forged_callback_signs_nobody_in(sso_app):
    client = sso_app(TIDECHAT_AUTH_MODE="open").test_client()
    client.get("/auth/oidc/login")
    response = client.get("/auth/oidc/callback?code=made-up&state=made-up")
    assert response.status_code == 302 and "auth_error=sso_failed" in response.location
    assert client.get("/api/auth/me").get_json()["user"] is None


def test_invite_mode_needs_an_invitation_for_a_new_sso_account(sso_app, issuer):
    app = sso_app(TIDECHAT_AUTH_MODE="invite")
    subject = provider_user(issuer, email=f"sso-{uuid.uuid4().hex[:8]}@example.com")
    client = app.test_client()
    refused = sign_in_with_provider(client, subject)
    assert "auth_error=invite_required" in refused.location
    with app.test_request_context():
        from tidechat import accounts, db

        code = accounts.create_invite(db.session(), None)
    done = sign_in_with_provider(client, subject, f"/auth/oidc/login?invite={code}")
    assert done.location == "/"
    assert client.get("/api/conversations").status_code == 200


def test_without_a_provider_there_is_no_sso(make_app):
    client = make_app().test_client()
    assert client.get("/api/auth/me").get_json()["oidc"] is None
    assert client.get("/auth/oidc/login").status_code == 404


def test_a_provider_out_of_reach_sends_the_browser_back_with_an_error(make_app):
    from tests.stack import free_port

    client = make_app(
        TIDECHAT_OIDC_ISSUER=f"http://127.0.0.1:{free_port()}", TIDECHAT_OIDC_CLIENT_ID="x"
    ).test_client()
    response = client.get("/auth/oidc/login")
    assert response.status_code == 302 and "auth_error=sso_failed" in response.location
