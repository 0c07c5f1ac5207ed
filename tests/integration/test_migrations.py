"""Migrations are the only way the schema changes: they match the models and run both ways."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from shared import migrate

DESIGN_TABLES = {
    "users",
    "accounts",
    "sessions",
    "verification_tokens",
    "organizations",
    "organization_members",
    "plans",
    "subscriptions",
    "projects",
    "api_keys",
    "usage_records",
}


@pytest.fixture
def empty_database(local_env: dict[str, str]) -> Iterator[str]:
    admin_url = make_url(local_env["DATABASE_URL"]).set(drivername="postgresql+psycopg")
    name = f"meterline_mig_{secrets.token_hex(4)}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield admin_url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_creates_every_design_table(empty_database: str) -> None:
    migrate.upgrade(empty_database)
    assert _tables(empty_database) >= DESIGN_TABLES


def test_usage_records_unique_is_nulls_not_distinct(empty_database: str) -> None:
    migrate.upgrade(empty_database)
    engine = sa.create_engine(empty_database)
    with engine.connect() as connection:
        definition = connection.scalar(
            sa.text("SELECT indexdef FROM pg_indexes WHERE indexname = 'uq_usage_records_window'")
        )
    engine.dispose()
    assert definition is not None
    assert "UNIQUE" in definition and "NULLS NOT DISTINCT" in definition
    for column in (
        "organization_id",
        "project_id",
        "api_key_id",
        "metric",
        "window_start",
        "window_seconds",
    ):
        assert column in definition


def test_models_and_migrations_agree(empty_database: str) -> None:
    migrate.upgrade(empty_database)
    migrate.check(empty_database)  # raises if autogenerate finds any difference


def test_downgrade_to_base_and_upgrade_again(empty_database: str) -> None:
    migrate.upgrade(empty_database)
    migrate.downgrade(empty_database, "base")
    assert _tables(empty_database) <= {"alembic_version"}
    migrate.upgrade(empty_database)
    assert _tables(empty_database) >= DESIGN_TABLES
    migrate.check(empty_database)


class _AnswersAs:
    """A connection to a server that reports `version_num` (only what the check reads)."""

    def __init__(self, real: sa.Connection, version_num: int, version: str) -> None:
        self.engine = real.engine
        self._answers = {"server_version_num": str(version_num), "server_version": version}

    def execute(self, statement: sa.TextClause) -> sa.Result:  # type: ignore[type-arg]
        name = str(statement).removeprefix("SHOW ")
        return _Scalar(self._answers[name])  # type: ignore[return-value]


class _Scalar:
    def __init__(self, value: str) -> None:
        self._value = value

    def scalar_one(self) -> str:
        return self._value


def test_postgresql_older_than_15_is_refused_with_its_version_named(engine: sa.Engine) -> None:
    from shared.db import require_postgres_version
    from shared.errors import ConfigurationError

    with engine.connect() as connection:
        require_postgres_version(connection)  # the real server of the tests: 15 or newer
        with pytest.raises(ConfigurationError, match=r"PostgreSQL 15 or newer.*runs 14\.9"):
            require_postgres_version(_AnswersAs(connection, 140009, "14.9"))  # type: ignore[arg-type]


def test_db_check_says_models_and_migrations_agree(service_env: dict[str, str]) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "meterline", "db", "check"],
        env=service_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "models and migrations agree"
