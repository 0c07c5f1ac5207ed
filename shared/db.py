"""Engines and units of work: transactions begin here, at the edge; callees take a session."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import ConfigurationError, DatabaseUnavailable
from shared.settings import Settings


@contextmanager
def pipelined(connection: sa.Connection) -> Iterator[None]:
    """The statements executed inside the block go to PostgreSQL at once, without waiting for
    each other's results (its pipeline mode): the process goes on with its own work while the
    database runs what was sent. The block's end waits for all of them; each statement's row
    count is known only then (rows_affected), and an error of any is raised there. SQLAlchemy
    handles that error as it handles one of a statement outside the block (the same DBAPIError
    classes; a lost connection is invalidated, so the pool does not hand it out again), so that
    callers tell a database that is down from one that refuses as they do elsewhere."""
    raw = connection.connection.driver_connection
    assert raw is not None
    driver_error = connection.dialect.loaded_dbapi.Error
    try:
        with raw.pipeline():
            yield
    except driver_error as exc:
        # SQLAlchemy's own path for a driver error (no statement: the sync raised it).
        connection._handle_dbapi_exception(exc, None, None, None, None)


def rows_affected(result: sa.CursorResult[Any] | None) -> int:
    """The rows a statement wrote. Inside `pipelined`, the result's own rowcount was read before
    the statement ran (-1): its cursor has the count once the block has ended."""
    if result is None:
        return 0
    count = result.rowcount
    return int(count if count >= 0 else result.context.cursor.rowcount)


def where(database_url: str) -> str:
    """host:port/db of a URL, never its password: safe for messages and logs."""
    url = make_url(database_url)
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database}"


def create_sync_engine(settings: Settings, **options: object) -> Engine:
    return sa.create_engine(
        settings.database_url,
        pool_pre_ping=True,
        connect_args={"connect_timeout": 5, "application_name": "meterline"},
        **options,
    )


def create_async_db_engine(settings: Settings, **options: object) -> AsyncEngine:
    return create_async_engine(
        settings.database_url,
        pool_pre_ping=True,
        connect_args={"connect_timeout": 5, "application_name": "meterline"},
        **options,
    )


@contextmanager
def unit_of_work(engine: Engine) -> Iterator[Session]:
    """One transaction: commits when the block ends, rolls back if it raises."""
    factory = sessionmaker(engine, expire_on_commit=False)
    try:
        with factory.begin() as session:
            yield session
    except sa_exc.OperationalError as exc:
        if _is_connection_failure(exc):
            raise DatabaseUnavailable(
                f"database unreachable at {where(str(engine.url))}: {_first_line(exc)}"
            ) from None
        raise


#: usage_records' unique key treats NULL project and key ids as equal (NULLS NOT DISTINCT),
#: which PostgreSQL has since version 15.
MIN_POSTGRES_VERSION = 15


def check_database(engine: Engine) -> None:
    """Raise DatabaseUnavailable with a one-line reason when the database does not answer, and
    ConfigurationError when its PostgreSQL is older than MIN_POSTGRES_VERSION."""
    try:
        with engine.connect() as connection:
            require_postgres_version(connection)
    except sa_exc.OperationalError as exc:
        raise DatabaseUnavailable(
            f"database unreachable at {where(str(engine.url))}: {_first_line(exc)}"
        ) from None


def require_postgres_version(connection: sa.Connection) -> None:
    """ConfigurationError unless the server is PostgreSQL MIN_POSTGRES_VERSION or newer."""
    number = int(connection.execute(sa.text("SHOW server_version_num")).scalar_one())
    if number < MIN_POSTGRES_VERSION * 10_000:
        version = connection.execute(sa.text("SHOW server_version")).scalar_one()
        raise ConfigurationError(
            f"PostgreSQL {MIN_POSTGRES_VERSION} or newer is required (usage_records needs "
            f"NULLS NOT DISTINCT); {where(str(connection.engine.url))} runs {version}"
        )


def _is_connection_failure(exc: sa_exc.OperationalError) -> bool:
    return exc.connection_invalidated or "connect" in str(exc.orig).lower()


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


def array_literal(values: Iterable[object]) -> str:
    """A PostgreSQL array literal of uuids, numbers, dates, times or text, for
    `CAST(:param AS type[])`.

    The driver adapts a Python list element by element in Python (a regular expression and a
    quoting pass per element), which costs more than the query for the arrays of tens of
    thousands of elements a billing run or an aggregator batch sends; PostgreSQL parses the
    literal in C. Every element is quoted, so commas, braces, spaces and the word NULL stay
    text; a text's backslashes and double quotes are escaped. None is NULL. Text must be
    storable (no NUL: the callers' input rules refuse it before)."""
    parts = []
    for value in values:
        if value is None:
            parts.append("NULL")
        elif isinstance(value, str):
            parts.append('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"')
        elif isinstance(value, datetime | date):
            parts.append(f'"{value.isoformat()}"')
        else:
            parts.append(f'"{value}"')
    return "{" + ",".join(parts) + "}"


def in_array(column: Any, values: Iterable[object], element: Any) -> sa.ColumnElement[bool]:
    """`column IN (SELECT unnest(CAST(:values AS element[])))`: one array parameter (an IN list
    binds each value apart). Not `column = ANY(...)`: the cast array is no constant to the
    planner, so ANY would search it element by element for every row, quadratic in a run's
    10,000 subscriptions; the unnested rows join by hash or index."""
    from sqlalchemy.dialects.postgresql import ARRAY

    array = sa.cast(sa.bindparam(None, array_literal(values), type_=sa.Text), ARRAY(element))
    return column.in_(sa.select(sa.func.unnest(array)).scalar_subquery())
