"""Accounts over JSON: sign up, sign in, sign out, who am I (``/api/auth``), and the
admin's routes (``/api/admin``). The rules live in :mod:`tidechat.accounts`."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, url_for

from tidechat import accounts, db, limits, oidc, security
from tidechat.errors import ApiError
from tidechat.views.api import json_body

bp = Blueprint("auth", __name__, url_prefix="/api/auth")
admin_bp = Blueprint("admin", __name__, url_prefix="/api/admin")
keys_bp = Blueprint("keys", __name__, url_prefix="/api/keys")


def _me():
    user = accounts.current_user()
    mode = current_app.config["AUTH_MODE"]
    provider = oidc.label(current_app)
    return jsonify(
        {
            "user": accounts.serialize_user(user) if user is not None else None,
            "mode": mode,
            "can_sign_up": mode != "invite",
            "oidc": {"label": provider, "url": url_for("oidc.login")} if provider else None,
        }
    )


@bp.get("/me")
def me():
    return _me()


@bp.post("/signup")
@limits.auth_attempts
def signup():
    body = json_body()
    accounts.sign_up(db.session(), body.get("email"), body.get("password"), body.get("invite"))
    return _me(), 201


@bp.post("/login")
@limits.auth_attempts
def login():
    body = json_body()
    accounts.log_in(db.session(), body.get("email"), body.get("password"))
    return _me()


@bp.post("/logout")
def logout():
    body = json_body() if security.has_body() else {}
    accounts.log_out(db.session(), everywhere=body.get("everywhere") is True)
    return "", 204


@admin_bp.before_request
def _admins_only():
    accounts.require_admin()


@admin_bp.get("/users")
def list_users():
    tokens = limits.tokens_today
    return jsonify(
        {
            "users": [
                {
                    **accounts.serialize_user(user),
                    "conversations": n,
                    "last_active_at": last.isoformat() if last else None,
                    "tokens_today": tokens(user.owner),
                }
                for user, n, last in accounts.list_users(db.session())
            ]
        }
    )


@admin_bp.patch("/users/<uid>")
def update_user(uid: str):
    body = json_body()
    disabled = body.get("disabled")
    if set(body) != {"disabled"} or not isinstance(disabled, bool):
        raise ApiError(400, "invalid_body", 'Send {"disabled": true or false}.')
    if disabled and uid == accounts.require_admin().id:
        raise ApiError(400, "cannot_disable_self", "An admin cannot disable their own account.")
    user = accounts.set_disabled(db.session(), uid, disabled)
    return jsonify(accounts.serialize_user(user))


@admin_bp.post("/invites")
def create_invite():
    code = accounts.create_invite(db.session(), accounts.require_admin().id)
    return jsonify({"code": code, "url": url_for("page.index", invite=code, _external=True)}), 201


@keys_bp.get("")
def list_keys():
    keys = accounts.api_keys(db.session(), accounts.current_owner())
    return jsonify({"keys": [accounts.serialize_key(k) for k in keys]})


@keys_bp.post("")
@limits.writes
def create_key():
    body = json_body() if security.has_body() else {}
    user = accounts.current_user()
    s = db.session()
    key, secret = accounts.create_api_key(
        s, accounts.current_owner(), user.id if user else None, body.get("name", "")
    )
    return jsonify({**accounts.serialize_key(key), "key": secret}), 201


@keys_bp.delete("/<key_id>")
@limits.writes
def revoke_key(key_id: str):
    accounts.revoke_api_key(db.session(), accounts.current_owner(), key_id)
    return "", 204
