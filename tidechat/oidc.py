"""Sign-in with an OpenID Connect provider (Authlib), when ``OIDC_ISSUER`` is set.

The provider is found by discovery (``<issuer>/.well-known/openid-configuration``); its
redirect URI for this app is ``<site>/auth/oidc/callback``. Authlib checks the state, the
nonce and the ID token's signature; :func:`tidechat.accounts.sign_in_external` decides who
that is.
"""

from __future__ import annotations

import logging

import requests
from authlib.common.errors import AuthlibBaseError
from authlib.integrations.flask_client import OAuth
from flask import Blueprint, Flask, current_app, redirect, request, session, url_for

from tidechat import accounts, db
from tidechat.errors import ApiError

log = logging.getLogger(__name__)
bp = Blueprint("oidc", __name__, url_prefix="/auth/oidc")
_EXT = "tidechat.oidc"
_INVITE = "oidc_invite"


def init_app(app: Flask) -> None:
    issuer = str(app.config.get("OIDC_ISSUER") or "").rstrip("/")
    if issuer:
        oauth = OAuth(app)
        oauth.register(
            "provider",
            client_id=app.config["OIDC_CLIENT_ID"],
            client_secret=app.config["OIDC_CLIENT_SECRET"],
            server_metadata_url=f"{issuer}/.well-known/openid-configuration",
            client_kwargs={"scope": "openid email profile"},
        )
        app.extensions[_EXT] = oauth
    app.register_blueprint(bp)


def label(app: Flask) -> str | None:
    """The sign-in button's text, or None when no provider is configured."""
    return str(app.config["OIDC_LABEL"]) if _EXT in app.extensions else None


def _client():
    oauth = current_app.extensions.get(_EXT)
    if oauth is None:
        raise ApiError(404, "not_found", "Single sign-on is not configured.")
    return oauth.create_client("provider")


@bp.get("/login")
def login():
    client = _client()
    invite = request.args.get("invite")
    if invite:
        session[_INVITE] = invite[:200]
    try:
        return client.authorize_redirect(url_for("oidc.callback", _external=True))
    except (AuthlibBaseError, requests.RequestException) as exc:  # e.g. discovery failed
        log.warning("OpenID Connect provider unavailable: %r", exc)
        return redirect(url_for("page.index", auth_error="sso_failed"))


@bp.get("/callback")
def callback():
    client = _client()
    try:
        token = client.authorize_access_token()
        claims = token.get("userinfo") or client.parse_id_token(token, nonce=None)
        accounts.sign_in_external(
            db.session(), str(claims["iss"]), dict(claims), session.get(_INVITE)
        )
    except (AuthlibBaseError, requests.RequestException) as exc:
        # a refused or forged callback, a bad token, or the provider out of reach
        log.warning("OpenID Connect sign-in failed: %r", exc)
        return redirect(url_for("page.index", auth_error="sso_failed"))
    except ApiError as exc:
        return redirect(url_for("page.index", auth_error=exc.code))
    return redirect(url_for("page.index"))
