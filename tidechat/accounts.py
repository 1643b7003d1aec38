"""Who is asking: accounts, sign-in sessions, guests, invitations and the admin role.

Every door (the page's JSON API, the event stream) asks :func:`current_owner`; nothing
else reads the session cookie.

- **Guests** (``AUTH_MODE=guest``, the default): each browser gets an owner id in Flask's
  signed session cookie. A guest who signs up or signs in keeps the chats made as a guest.
- **Accounts**: email and password (argon2id, argon2-cffi), or an OpenID Connect provider
  (:mod:`tidechat.oidc`). A sign-in is an :class:`AuthSession` row; the cookie holds its
  random token and the database only the token's hash. Signing out revokes that row;
  "sign out everywhere" revokes all of the account's, so a copied cookie stops working.
- ``open`` and ``invite`` modes answer 401 to every ``/api`` route but ``/api/auth/*``
  without a sign-in; ``invite`` takes sign-ups with an invitation code only.
- **Admins**: the emails in ``ADMIN_EMAILS``, or, when it is empty, the first account.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
from datetime import datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from flask import Flask, current_app, g, request, session
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from tidechat import db, health, hygiene
from tidechat.errors import ApiError
from tidechat.models import ApiKey, AuthSession, Conversation, Invite, User, new_id, utcnow

_hasher = PasswordHasher()
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s.]+(\.[^@\s.]+)+", re.ASCII)
_MAX_PASSWORD_CHARS = 1000
_TOUCH_EVERY = timedelta(hours=1)  # how often a session's last use is written down
_G_USER = "tidechat_user"
_G_KEY = "tidechat_api_key"
API_PATH = "/v1/"  # the OpenAI-compatible API: bearer keys, never cookies
KEY_PREFIX = "tc-"


def init_app(app: Flask) -> None:
    app.config["ADMIN_EMAILS"] = _email_set(app.config.get("ADMIN_EMAILS"))

    @app.before_request
    def _require_sign_in():
        if app.config["AUTH_MODE"] == "guest" or not request.path.startswith("/api/"):
            return None
        if request.path.startswith("/api/auth/") or current_user() is not None:
            return None
        if request.path.startswith("/api/admin/") and health.operator(by_address=False):
            return None  # the operator's token (tidechat/views/operations.py)
        raise ApiError(401, "login_required", "Sign in to use this service.")


def _email_set(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        value = value.split(",")
    return frozenset(e.strip().lower() for e in value or () if e.strip())


# --- who is asking --------------------------------------------------------------------


def current_user() -> User | None:
    """The signed-in account of this request, or None (a guest, or signed out)."""
    if _G_USER not in g:
        g.setdefault(_G_USER, _user_of_session())
    return g.get(_G_USER)


def current_owner() -> str:
    """The owner id of everything this request may see: its API key's (on /v1), else its
    account's, else its guest's."""
    if request.path.startswith(API_PATH):
        key = current_key()
        if key is None:
            raise ApiError(401, "invalid_api_key", "Incorrect or revoked API key.")
        return key.owner
    user = current_user()
    if user is not None:
        return user.owner
    if current_app.config["AUTH_MODE"] != "guest":
        raise ApiError(401, "login_required", "Sign in to use this service.")
    owner = session.get("owner")
    if not isinstance(owner, str):
        owner = new_id()
        session["owner"] = owner
        session.permanent = True
    return owner


def client_address() -> str:
    """The client's address (after ProxyFix: the one the trusted proxies saw)."""
    return request.remote_addr or "unknown"


# Built once (building an ORM statement on each request cost more than running it), with
# the user in the same query: every request of a signed-in user, and every /v1 request,
# looks its session or key up.
_SESSION_BY_HASH = (
    select(AuthSession)
    .options(joinedload(AuthSession.user, innerjoin=True))
    .where(AuthSession.token_hash == bindparam("hash"), AuthSession.revoked_at.is_(None))
)
_KEY_BY_HASH = (
    select(ApiKey)
    .options(joinedload(ApiKey.user))
    .where(ApiKey.key_hash == bindparam("hash"), ApiKey.revoked_at.is_(None))
)


def _user_of_session() -> User | None:
    token = session.get("sid")
    if not isinstance(token, str):
        return None
    s = db.session()
    row = s.scalar(_SESSION_BY_HASH, {"hash": _digest(token)})
    now = utcnow()
    if row is None or row.user.disabled or now - row.last_seen_at > _session_lifetime():
        session.pop("sid", None)  # signed out elsewhere, disabled or expired
        return None
    if now - row.last_seen_at > _TOUCH_EVERY:
        row.last_seen_at = now
        s.commit()
    return row.user


def current_key() -> ApiKey | None:
    """The API key of this request's ``Authorization: Bearer``, if it is a live one."""
    if _G_KEY not in g:
        g.setdefault(_G_KEY, _key_of_request())
    return g.get(_G_KEY)


def _key_of_request() -> ApiKey | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(KEY_PREFIX) or len(token) > 200:
        return None
    s = db.session()
    key = s.scalar(_KEY_BY_HASH, {"hash": _digest(token)})
    if key is None or (key.user is not None and key.user.disabled):
        return None
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > _TOUCH_EVERY:
        key.last_used_at = now
        s.commit()
    return key


def create_api_key(
    s: Session, owner: str, user_id: str | None, name: Any = ""
) -> tuple[ApiKey, str]:
    """A new key acting as ``owner``, and its secret: shown once, never stored."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    label = name.strip()[:100] if isinstance(name, str) else ""
    key = ApiKey(
        id=new_id(), key_hash=_digest(secret), owner=owner, user_id=user_id, name=label,
        hint=secret[-4:],
    )  # fmt: skip
    s.add(key)
    s.commit()
    return key, secret


def api_keys(s: Session, owner: str) -> list[ApiKey]:
    query = (
        select(ApiKey)
        .where(ApiKey.owner == owner, ApiKey.revoked_at.is_(None))
        .order_by(ApiKey.created_at)
    )
    return list(s.scalars(query))


def revoke_api_key(s: Session, owner: str, key_id: str) -> None:
    # Not an id of ours (e.g. NUL, which PostgreSQL refuses even in a lookup): no query.
    key = s.get(ApiKey, key_id) if isinstance(key_id, str) and hygiene.is_id(key_id) else None
    if key is None or key.owner != owner or key.revoked_at is not None:
        raise ApiError(404, "not_found", "No such API key.")
    key.revoked_at = utcnow()
    s.commit()


def serialize_key(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "hint": "…" + key.hint,
        "created_at": key.created_at.isoformat(),
        "last_used_at": key.last_used_at.isoformat() if key.last_used_at else None,
    }


def _session_lifetime() -> timedelta:
    return timedelta(days=float(current_app.config["SESSION_DAYS"]))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- signing up, in and out -----------------------------------------------------------


def sign_up(s: Session, email: Any, password: Any, invite: Any = None) -> User:
    email = parse_email(email)
    check_password(password, email)
    mode = current_app.config["AUTH_MODE"]
    admins = current_app.config["ADMIN_EMAILS"]
    if s.scalar(select(User.id).where(User.email == email)) is not None:
        raise ApiError(409, "email_taken", "An account with this email exists; sign in instead.")
    user = User(id=new_id(), email=email, password_hash=_hasher.hash(password), owner=new_id())
    user.is_admin = email in admins or (not admins and not _any_user(s))
    if mode == "invite" and email not in admins:
        take_invite(s, invite, user.id)
    s.add(user)
    try:
        s.flush()
    except IntegrityError:  # the same email, signing up at the same moment
        s.rollback()
        raise ApiError(
            409, "email_taken", "An account with this email exists; sign in instead."
        ) from None
    start_session(s, user)
    return user


def log_in(s: Session, email: Any, password: Any) -> User:
    email = parse_email(email, strict=False)
    if not isinstance(password, str) or len(password) > _MAX_PASSWORD_CHARS:
        password = ""
    user = s.scalar(select(User).where(User.email == email))
    stored = user.password_hash if user is not None and user.password_hash else _dummy_hash()
    try:
        _hasher.verify(stored, password)
        ok = user is not None and stored is not _dummy_hash()
    except (VerificationError, InvalidHashError):
        ok = False
    if not ok:
        raise ApiError(401, "invalid_credentials", "Wrong email or password.")
    if user.disabled:
        raise ApiError(403, "account_disabled", "This account is disabled.")
    if _hasher.check_needs_rehash(stored):
        user.password_hash = _hasher.hash(password)
    start_session(s, user)
    return user


@functools.cache
def _dummy_hash() -> str:
    """Verified against when an email is unknown: a wrong email costs as long as a wrong
    password, so the time taken does not tell which accounts exist."""
    return _hasher.hash(secrets.token_hex(16))


def start_session(s: Session, user: User) -> None:
    """Sign this browser in as ``user`` (a new session token: never the one it came with)."""
    guest = session.get("owner")
    if isinstance(guest, str) and guest != user.owner:
        # Chats (and API keys) this browser made as a guest join the account.
        s.execute(update(Conversation).where(Conversation.owner == guest).values(owner=user.owner))
        s.execute(
            update(ApiKey).where(ApiKey.owner == guest).values(owner=user.owner, user_id=user.id)
        )
    token = secrets.token_urlsafe(32)
    agent = (request.user_agent.string or "")[:200] or None
    s.add(AuthSession(token_hash=_digest(token), user_id=user.id, user_agent=agent))
    user.last_login_at = utcnow()
    s.commit()
    session.clear()
    session["sid"] = token
    session.permanent = True
    g.pop(_G_USER, None)


def log_out(s: Session, everywhere: bool = False) -> None:
    """End this browser's sign-in (or every sign-in of its account)."""
    token, user = session.get("sid"), current_user()
    if user is not None and everywhere:
        revoke_sessions(s, user.id)
    elif isinstance(token, str):
        s.execute(
            update(AuthSession)
            .where(AuthSession.token_hash == _digest(token), AuthSession.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        s.commit()
    session.clear()  # back to a new guest: never the account's own owner id
    g.pop(_G_USER, None)


def revoke_sessions(s: Session, user_id: str) -> None:
    s.execute(
        update(AuthSession)
        .where(AuthSession.user_id == user_id, AuthSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    s.commit()


def sign_in_external(s: Session, issuer: str, claims: dict[str, Any], invite: Any) -> User:
    """Sign in (or up) with an identity provider's verified claims (``sub``, ``email``)."""
    subject = str(claims["sub"])
    user = s.scalar(select(User).where(User.oidc_issuer == issuer, User.oidc_subject == subject))
    email = claims.get("email") if claims.get("email_verified") else None
    email = parse_email(email, strict=False) if isinstance(email, str) else None
    if user is None and email is not None:
        # Link an existing account only by an address the provider says it verified.
        user = s.scalar(select(User).where(User.email == email, User.oidc_subject.is_(None)))
        if user is not None:
            user.oidc_issuer, user.oidc_subject = issuer, subject
    if user is None:
        admins = current_app.config["ADMIN_EMAILS"]
        taken = email is not None and s.scalar(select(User.id).where(User.email == email))
        user = User(
            id=new_id(), email=None if taken else email, owner=new_id(),
            oidc_issuer=issuer, oidc_subject=subject,
        )  # fmt: skip
        user.is_admin = (email or "") in admins or (not admins and not _any_user(s))
        if current_app.config["AUTH_MODE"] == "invite" and (email or "") not in admins:
            take_invite(s, invite, user.id)
        s.add(user)
        s.flush()
    if user.disabled:
        raise ApiError(403, "account_disabled", "This account is disabled.")
    start_session(s, user)
    return user


def _any_user(s: Session) -> bool:
    return s.scalar(select(User.id).limit(1)) is not None


# --- input ----------------------------------------------------------------------------


def parse_email(value: Any, strict: bool = True) -> str:
    email = value.strip().lower() if isinstance(value, str) else ""
    if len(email) > 254 or not _EMAIL.fullmatch(email):
        if not strict:
            return ""  # a log-in with a malformed address: just wrong credentials
        raise ApiError(400, "invalid_email", "'email' must be an email address.")
    return email


def check_password(password: Any, email: str) -> None:
    least = int(current_app.config["MIN_PASSWORD_CHARS"])
    if not isinstance(password, str) or not least <= len(password) <= _MAX_PASSWORD_CHARS:
        raise ApiError(
            400, "weak_password",
            f"'password' must be {least} to {_MAX_PASSWORD_CHARS} characters.",
        )  # fmt: skip
    if password.strip().lower() == email:
        raise ApiError(400, "weak_password", "The password must not be the email address.")


# --- invitations and administration ---------------------------------------------------


def create_invite(s: Session, created_by: str | None) -> str:
    """A one-time sign-up code, valid for ``INVITE_DAYS``."""
    code = secrets.token_urlsafe(16)
    days = float(current_app.config["INVITE_DAYS"])
    s.add(
        Invite(
            code_hash=_digest(code),
            created_by=created_by,
            expires_at=utcnow() + timedelta(days=days),
        )  # fmt: skip
    )
    s.commit()
    return code


def take_invite(s: Session, code: Any, user_id: str) -> None:
    """Use up an invitation, once: two sign-ups with one code cannot both succeed."""
    taken = isinstance(code, str) and len(code) < 200
    if taken:
        result = s.execute(
            update(Invite)
            .where(
                Invite.code_hash == _digest(code.strip()),
                Invite.used_by.is_(None),
                Invite.expires_at > utcnow(),
            )
            .values(used_by=user_id)
        )
        taken = result.rowcount == 1
    if not taken:
        raise ApiError(403, "invite_required", "Sign-up here needs a valid invitation code.")


def is_admin(user: User | None) -> bool:
    return user is not None and (
        user.is_admin or (user.email or "") in current_app.config["ADMIN_EMAILS"]
    )


def require_admin() -> User:
    user = current_user()
    if not is_admin(user):
        raise ApiError(404, "not_found", "No such resource.")  # admin pages are not advertised
    return user


def set_disabled(s: Session, user_id: str, disabled: bool) -> User:
    user = s.get(User, user_id)
    if user is None:
        raise ApiError(404, "not_found", "No such user.")
    user.disabled = disabled
    s.commit()
    if disabled:
        revoke_sessions(s, user.id)
    return user


def list_users(s: Session) -> list[tuple[User, int, datetime | None]]:
    """Every account with how many conversations it has and when it last chatted."""
    stats = (
        select(
            Conversation.owner,
            func.count(Conversation.id).label("n"),
            func.max(Conversation.updated_at).label("last"),
        )
        .group_by(Conversation.owner)
        .subquery()
    )
    rows = s.execute(
        select(User, stats.c.n, stats.c.last)
        .outerjoin(stats, stats.c.owner == User.owner)
        .order_by(User.created_at)
    )
    return [(user, n or 0, last) for user, n, last in rows]


def serialize_user(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "email": user.email,
        "admin": is_admin(user),
        "disabled": user.disabled,
        "created_at": user.created_at.isoformat(),
    }
