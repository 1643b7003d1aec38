"""Alembic environment: the URL comes from Tidechat's config, the schema from its models."""

from alembic import context

from tidechat.db import make_engine
from tidechat.models import Base

config = context.config


def database_url() -> str:
    url = config.attributes.get("database_url")
    if url:
        return url
    from app import create_app

    return create_app().config["DATABASE_URL"]


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(database_url())
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=Base.metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
