"""Run Alembic from code: `meterline db upgrade|downgrade|check` and the test fixtures use this."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError

from shared.errors import Conflict

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


DEFAULT_LOCK_TIMEOUT_SECONDS = 10


def alembic_config(
    database_url: str, *, lock_timeout_seconds: int = DEFAULT_LOCK_TIMEOUT_SECONDS
) -> Config:
    config = Config(str(MIGRATIONS / "alembic.ini"))
    # How long a migration waits for a lock the running services hold before it gives up.
    config.attributes["lock_timeout_seconds"] = lock_timeout_seconds
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


@contextmanager
def _named_errors() -> Iterator[None]:
    """Alembic's refusals (an unknown revision, say: the database was migrated by a newer
    Meterline, or REVISION is mistyped) as one Conflict naming the problem, not a traceback."""
    try:
        yield
    except CommandError as exc:
        raise Conflict(f"migration refused: {exc}") from None


def upgrade(
    database_url: str,
    revision: str = "head",
    *,
    lock_timeout_seconds: int = DEFAULT_LOCK_TIMEOUT_SECONDS,
) -> None:
    with _named_errors():
        command.upgrade(
            alembic_config(database_url, lock_timeout_seconds=lock_timeout_seconds), revision
        )


def downgrade(database_url: str, revision: str) -> None:
    with _named_errors():
        command.downgrade(alembic_config(database_url), revision)


def check(database_url: str) -> None:
    """Raise if the models declare anything the migrations do not create."""
    command.check(alembic_config(database_url))


def current(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
