"""shared.db.pipelined: statements sent without waiting still count, refuse and fail as they do
outside the block, so that the aggregator's batch tells a refusal from an outage."""

from __future__ import annotations

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from services.aggregator.refusals import is_refusal, is_transient
from shared.db import pipelined, rows_affected

TABLE = "CREATE TEMPORARY TABLE piped (n integer PRIMARY KEY CHECK (n < 1000)) ON COMMIT DROP"
INSERT = (
    "INSERT INTO piped SELECT generate_series(%(low)s::integer, %(high)s::integer)"
    " ON CONFLICT DO NOTHING"
)


def test_each_statement_counts_its_own_rows_once_the_block_has_ended(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.exec_driver_sql(TABLE)
        with pipelined(connection):
            first = connection.exec_driver_sql(INSERT, {"low": 1, "high": 300})
            second = connection.exec_driver_sql(INSERT, {"low": 201, "high": 500})
        counted = [rows_affected(first), rows_affected(second), rows_affected(None)]
        stored = connection.exec_driver_sql("SELECT count(*) FROM piped").scalar_one()

    assert counted == [300, 200, 0]
    assert stored == 500


def test_a_refused_statement_raises_as_a_refusal(engine: Engine) -> None:
    with pytest.raises(sa_exc.IntegrityError) as refused, engine.begin() as connection:
        connection.exec_driver_sql(TABLE)
        with pipelined(connection):
            connection.exec_driver_sql(INSERT, {"low": 1, "high": 10})
            connection.exec_driver_sql(INSERT, {"low": 995, "high": 1005})

    assert is_refusal(refused.value) and not is_transient(refused.value)
    assert "piped_n_check" in str(refused.value.orig)


def test_a_lost_connection_raises_as_transient(engine: Engine) -> None:
    with (
        pytest.raises(sa_exc.DBAPIError) as lost,
        engine.begin() as connection,
        pipelined(connection),
    ):
        connection.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")
        connection.exec_driver_sql("SELECT 1")

    assert is_transient(lost.value)
    with engine.connect() as connection:  # the pool hands out a working connection again
        assert connection.exec_driver_sql("SELECT 1").scalar_one() == 1
