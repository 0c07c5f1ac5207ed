"""Migrations are the only way the schema changes: they match the models and run both ways, and
the ones that build usage_daily lock usage_records, so usage written from another connection while
they run is in the rollup, which ends exactly equal to usage_records."""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url

from shared import migrate
from shared.models import Base
from shared.usage import UsageDelta, record_usage

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


def test_every_storage_parameter_of_the_models_is_in_the_database(empty_database: str) -> None:
    # Autogenerate compares no storage parameters: the fillfactors the models declare (room for
    # in-place updates on the tables every batch or billing run rewrites) are checked here.
    declared = {
        table.name: {f"{k}={v}" for k, v in table.dialect_options["postgresql"]["with"].items()}
        for table in Base.metadata.tables.values()
        if table.dialect_options["postgresql"].get("with")
    }
    assert {"usage_records", "meter_windows", "usage_versions", "subscriptions"} <= set(declared)
    migrate.upgrade(empty_database)
    engine = sa.create_engine(empty_database)
    with engine.connect() as connection:
        found = {
            name: set(options or [])
            for name, options in connection.execute(
                sa.text("SELECT relname, reloptions FROM pg_class WHERE relname = ANY(:names)"),
                {"names": list(declared)},
            )
        }
    engine.dispose()
    assert {name: declared[name] - found.get(name, set()) for name in declared} == {
        name: set() for name in declared
    }


def _index_of(url: str, name: str) -> tuple[bool, str] | None:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        row = connection.execute(
            sa.text(
                "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index AS i"
                " JOIN pg_class AS c ON c.oid = i.indexrelid WHERE c.relname = :name"
            ),
            {"name": name},
        ).one_or_none()
    engine.dispose()
    return None if row is None else (row[0], row[1])


def test_0026_rerun_keeps_a_finished_build_that_is_the_only_unique_index(
    empty_database: str,
) -> None:
    # An earlier run built the new index and dropped the old one, then stopped before the
    # rename: the new index is all that enforces uniqueness, and the rerun must keep it.
    migrate.upgrade(empty_database, "0025_update_room")
    engine = sa.create_engine(empty_database)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "CREATE UNIQUE INDEX uq_meter_values_value_next ON meter_values (organization_id,"
                " metric, window_start, window_seconds, value, project_id, api_key_id, dimensions)"
                " NULLS NOT DISTINCT"
            )
        )
        connection.execute(sa.text("DROP INDEX uq_meter_values_value"))
    engine.dispose()
    migrate.upgrade(empty_database)
    assert _index_of(empty_database, "uq_meter_values_value_next") is None
    found = _index_of(empty_database, "uq_meter_values_value")
    assert found is not None and found[0]
    assert "(organization_id, metric, window_start, window_seconds, value," in found[1]
    migrate.check(empty_database)


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


DAY = datetime(2026, 11, 10, tzinfo=UTC)


@pytest.fixture
def database(empty_database: str) -> Iterator[tuple[str, Engine]]:
    engine = sa.create_engine(empty_database)
    yield empty_database, engine
    engine.dispose()


def _organization(engine: Engine) -> uuid.UUID:
    organization_id = uuid.uuid4()
    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO organizations (id, name, slug) VALUES (:id, 'Org', :slug)"),
            {"id": organization_id, "slug": f"o-{organization_id.hex[:8]}"},
        )
    return organization_id


def _usage(organization_id: uuid.UUID, days: range, quantity: str) -> list[UsageDelta]:
    return [
        UsageDelta(
            organization_id,
            None,
            None,
            "api_calls",
            DAY + timedelta(days=day, hours=hour),
            3600,
            Decimal(quantity),
            1,
        )
        for day in days
        for hour in (0, 7, 23)
    ]


def _rollup(connection: Connection) -> dict[tuple[object, ...], tuple[object, ...]]:
    rows = connection.execute(
        sa.text(
            "SELECT organization_id, metric, window_seconds, day, quantity, max_window_quantity,"
            " event_count FROM usage_daily"
        )
    )
    return {tuple(row[:4]): tuple(row[4:]) for row in rows}


def _rollup_from_records(connection: Connection) -> dict[tuple[object, ...], tuple[object, ...]]:
    rows = connection.execute(
        sa.text(
            "SELECT organization_id, metric, window_seconds, day, sum(q), max(q), sum(n) FROM ("
            " SELECT organization_id, metric, window_seconds,"
            " (window_start AT TIME ZONE 'UTC')::date AS day, window_start,"
            " sum(quantity) AS q, sum(event_count) AS n FROM usage_records"
            " GROUP BY 1, 2, 3, 4, 5) AS w GROUP BY 1, 2, 3, 4"
        )
    )
    return {tuple(row[:4]): tuple(row[4:]) for row in rows}


def _migrate_while_writing(
    url: str, engine: Engine, revision: str, writes: list[UsageDelta]
) -> str:
    """Run the migration while another connection has written `writes` and not yet committed;
    commit them once the migration waits for a lock. Returns the lock mode it waited for."""
    writer = engine.connect()
    transaction = writer.begin()
    record_usage(writer, writes)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            # Generous: on a loaded machine the watcher below may take a while to see the wait.
            migrate.upgrade(url, revision, lock_timeout_seconds=120)
        except BaseException as exc:
            failure.append(exc)

    migration = threading.Thread(target=run)
    migration.start()
    waited_for = ""
    deadline = time.monotonic() + 100
    # Autocommit: pg_stat_activity is read once per transaction, so a watcher inside one
    # transaction would never see the migration's backend if it connected after the first poll.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watcher:
        while not waited_for and time.monotonic() < deadline and migration.is_alive():
            waited_for = (
                watcher.execute(
                    sa.text(
                        "SELECT l.mode FROM pg_locks AS l"
                        "  JOIN pg_stat_activity AS a ON a.pid = l.pid"
                        " WHERE NOT l.granted AND a.datname = current_database()"
                        "   AND l.relation = CAST('usage_records' AS regclass)"
                    )
                ).scalar()
                or ""
            )
            time.sleep(0.05)
    # More usage in the same transaction, then the commit the migration waited for.
    record_usage(writer, writes[:2])
    transaction.commit()
    writer.close()
    migration.join(60)
    assert not failure, failure
    return waited_for


def test_fresh_install_of_0007_counts_usage_written_while_it_runs(
    database: tuple[str, Engine],
) -> None:
    url, engine = database
    migrate.upgrade(url, "0006_invoice_plan_snapshot")
    organization_id = _organization(engine)
    with engine.begin() as connection:
        record_usage(connection, _usage(organization_id, range(0, 3), "2"))

    waited_for = _migrate_while_writing(
        url, engine, "0007_usage_daily_rollup", _usage(organization_id, range(2, 5), "3.5")
    )

    assert waited_for == "ShareRowExclusiveLock"
    with engine.connect() as connection:
        assert _rollup(connection) == _rollup_from_records(connection)
        assert len(_rollup(connection)) == 5


def test_0008_repairs_the_rollup_under_a_lock_while_usage_is_written(
    database: tuple[str, Engine],
) -> None:
    url, engine = database
    migrate.upgrade(url, "0007_usage_daily_rollup")
    organization_id = _organization(engine)
    with engine.begin() as connection:
        record_usage(connection, _usage(organization_id, range(0, 4), "1.25"))
        # What the first 0007 could leave: a day missing, a day short of what was written.
        connection.execute(sa.text("ALTER TABLE usage_records DISABLE TRIGGER USER"))
        record_usage(connection, _usage(organization_id, range(3, 6), "4"))
        connection.execute(sa.text("ALTER TABLE usage_records ENABLE TRIGGER USER"))
        assert _rollup(connection) != _rollup_from_records(connection)

    waited_for = _migrate_while_writing(
        url, engine, "0008_usage_daily_repair", _usage(organization_id, range(5, 7), "7")
    )

    assert waited_for == "ShareRowExclusiveLock"
    with engine.connect() as connection:
        assert _rollup(connection) == _rollup_from_records(connection)
        assert len(_rollup(connection)) == 7
