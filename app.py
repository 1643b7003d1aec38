"""Tidechat's Flask app factory: configuration, storage, Redis, Celery and the views."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import click
from flask import Flask
from sqlalchemy import select

from tidechat import (
    accounts,
    db,
    errors,
    health,
    limits,
    logs,
    models,
    oidc,
    redis_conn,
    security,
)  # fmt: skip
from tidechat.config import INSTANCE_DIR, finalize, load_config, redis_keys
from tidechat.stream_bus import StreamBus
from tidechat.views import api, auth, events, openai_api, operations, page
from worker import celery_init_app


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__, instance_path=str(INSTANCE_DIR))
    app.config.from_mapping(load_config())
    app.config.from_prefixed_env("TIDECHAT")
    if test_config:
        app.config.update(test_config)
    finalize(app.config)
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=timedelta(days=400),
    )

    errors.register(app)
    security.init_app(app)  # first: its checks run before any other (the rate limiter's)
    db.init_app(app)
    init_redis(app)
    accounts.init_app(app)  # before the limiter: a request with no sign-in stops here
    limits.init_app(app)
    oidc.init_app(app)
    celery_init_app(app)
    logs.init_app(app)  # request ids: its middleware wraps the others (security's)

    app.register_blueprint(page.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(events.bp)
    app.register_blueprint(auth.bp)
    app.register_blueprint(auth.admin_bp)
    app.register_blueprint(auth.keys_bp)
    app.register_blueprint(openai_api.bp)
    app.register_blueprint(operations.bp)
    health.init_app(app)

    @app.cli.command("init-db")
    def init_db() -> None:
        """Create or migrate the database schema (the Procfile's release step)."""
        db.upgrade(app.config["DATABASE_URL"])
        click.echo("database is at the latest revision")

    @app.cli.command("api-key")
    @click.argument("action", type=click.Choice(["create"]))
    @click.option("--user", "email", help="The account the key acts for (default: a new "
                  "service account of its own).")  # fmt: skip
    @click.option("--name", default="", help="A label for the key.")
    def api_key(action: str, email: str | None, name: str) -> None:
        """Create a key for the /v1 API; the key is the last line printed."""
        with app.test_request_context():
            s = db.session()
            owner, user_id = models.new_id(), None
            if email:
                user = s.scalar(select(models.User).where(models.User.email == email.lower()))
                if user is None:
                    raise click.ClickException(f"no account with the email {email}")
                owner, user_id = user.owner, user.id
            _, secret = accounts.create_api_key(s, owner, user_id, name)
        click.echo(secret)

    @app.cli.command("invite")
    def invite() -> None:
        """Print a one-time sign-up code (for TIDECHAT_AUTH_MODE=invite)."""
        with app.test_request_context():
            code = accounts.create_invite(db.session(), None)
        click.echo(code)

    return app


def init_redis(app: Flask) -> None:
    client = redis_conn.client(
        app.config["REDIS_URL"], max_connections=int(app.config.get("REDIS_MAX_CONNECTIONS", 10))
    )
    keys = redis_keys(app.config)
    app.extensions["redis_keys"] = keys
    app.extensions["stream_bus"] = StreamBus(client, keys, app.config["STREAM_TTL"])
