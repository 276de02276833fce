"""Alembic's environment for the results database: run by chestxray.store.upgrade on the connection it hands over
(config.attributes["connection"]), so the app, the tests and the `alembic` command all migrate the same way."""
from __future__ import annotations

from alembic import context

from chestxray.store.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # the alembic command line: connect to sqlalchemy.url
        from sqlalchemy import create_engine

        with create_engine(config.get_main_option("sqlalchemy.url")).connect() as connection:
            _run(connection)
    else:
        _run(connection)


def _run(connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things in place; batch mode copies the table (Alembic's advice).
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported: run them against a database")
run_migrations_online()
