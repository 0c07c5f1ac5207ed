"""Alembic environment: one transaction per migration, with lock and statement timeouts."""

from __future__ import annotations

import re

from alembic import context
from sqlalchemy import create_engine, pool, text

import shared.models  # noqa: F401  (registers every table on the metadata)
from shared.db import require_postgres_version
from shared.models.base import Base
from shared.settings import get_settings

config = context.config
target_metadata = Base.metadata

# Time partitions of partitioned tables are created at run time, not declared as models.
_PARTITION = re.compile(r"^.+_p\d{8}$|^.+_pdefault$")


def include_object(obj, name, type_, reflected, compare_to):  # type: ignore[no-untyped-def]
    return not (type_ == "table" and reflected and name and _PARTITION.match(name))


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().database_url


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        include_object=include_object,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is not None:
        _run(connectable)
        return
    engine = create_engine(_url(), poolclass=pool.NullPool, connect_args={"connect_timeout": 5})
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    # The schema needs PostgreSQL 15 (NULLS NOT DISTINCT): refuse an older server before any DDL.
    require_postgres_version(connection)
    # Fail fast rather than queue behind a long transaction of the running services.
    lock_timeout = int(config.attributes.get("lock_timeout_seconds", 10))
    connection.execute(text(f"SET lock_timeout = '{lock_timeout}s'"))
    connection.execute(text("SET statement_timeout = '5min'"))
    connection.commit()
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_object=include_object,
        transaction_per_migration=True,
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
