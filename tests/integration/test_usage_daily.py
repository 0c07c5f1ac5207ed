"""usage_daily stays the exact daily rollup of usage_records whoever writes them, usage_monthly the
exact monthly rollup of both, and billing's period totals read from them equal the totals read
straight from usage_records."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from services.billing.usage_totals import SegmentQuery, segment_totals
from shared.models import Organization
from shared.usage import UsageDelta, UsageWindow, delete_usage, record_usage, set_usage
from tests import factories

START = datetime(2026, 11, 1, tzinfo=UTC)
METRICS = ("api_calls", "seats", "storage_gb")
# Periods with midnight and non-midnight boundaries, ones without a whole day, and one that
# starts before any usage and ends after it.
PERIODS = (
    (START, START + timedelta(days=5)),
    (START + timedelta(hours=7, minutes=30), START + timedelta(days=3, hours=13)),
    (START + timedelta(days=1, hours=10), START + timedelta(days=1, hours=18)),
    (START + timedelta(days=1, hours=23), START + timedelta(days=2, hours=1)),
    (START + timedelta(days=2, minutes=1), START + timedelta(days=4, seconds=59)),
    (START - timedelta(days=2, hours=3), START + timedelta(days=9, hours=5)),
    (START + timedelta(days=3), START + timedelta(days=3, hours=12)),
)


@dataclass(frozen=True)
class World:
    organizations: list[uuid.UUID]
    scopes: dict[uuid.UUID, list[tuple[uuid.UUID | None, uuid.UUID | None]]]


def _random_usage(world: World, rng: random.Random) -> list[UsageDelta]:
    """Windows over six days: hourly mostly, minute windows on day 2 (starts off the hour), and
    on day 3 daily windows beside the hourly ones (a window-size change: starts shared)."""
    deltas = []
    for organization_id in world.organizations:
        for metric in METRICS:
            for hour in range(6 * 24):
                window_start = START + timedelta(hours=hour)
                sizes = [3600]
                if hour // 24 == 2:
                    sizes = [60]
                    window_start += timedelta(minutes=rng.randrange(60))
                # Large enough that only the two sizes summed are that day's largest window.
                large = 0
                if hour % 24 == 0 and hour // 24 == 3:
                    sizes = [3600, 86400]
                    large = 10**6
                for size in sizes:
                    for project_id, api_key_id in world.scopes[organization_id]:
                        if rng.random() < 0.3:
                            continue
                        deltas.append(
                            UsageDelta(
                                organization_id,
                                project_id,
                                api_key_id,
                                metric,
                                window_start,
                                size,
                                large
                                + Decimal(rng.randrange(0, 10**6)) / 10 ** rng.randrange(0, 5),
                                rng.randrange(1, 50),
                            )
                        )
    return deltas


@pytest.fixture
def world(db: Session) -> Iterator[World]:
    organizations = []
    scopes: dict[uuid.UUID, list[tuple[uuid.UUID | None, uuid.UUID | None]]] = {}
    for _ in range(3):
        organization = factories.make_organization(db)
        project_a = factories.make_project(db, organization)
        project_b = factories.make_project(db, organization)
        key_a = factories.make_api_key(db, organization, project=project_a).key
        key_b = factories.make_api_key(db, organization, project=project_b).key
        key_org = factories.make_api_key(db, organization).key
        organizations.append(organization.id)
        scopes[organization.id] = [
            (None, None),
            (project_a.id, None),
            (project_a.id, key_a.id),
            (project_b.id, key_b.id),
            (None, key_org.id),
        ]
    db.flush()
    world = World(organizations, scopes)
    rng = random.Random(20261125)
    deltas = _random_usage(world, rng)
    # In a few statements, as the aggregator's batches write them (twice over some windows).
    for part in range(4):
        record_usage(db, deltas[part::4])
    record_usage(db, rng.sample(deltas, len(deltas) // 5))
    yield world


def _queries(world: World) -> list[SegmentQuery]:
    """Every period of every organization, once with every metric summed, once by max."""
    return [
        SegmentQuery(organization_id, start, end, METRICS, max_metrics)
        for organization_id in world.organizations
        for start, end in PERIODS
        for max_metrics in ((), METRICS)
    ]


def _reference_totals(
    connection: Connection, queries: list[SegmentQuery]
) -> list[dict[str, Decimal]]:
    """The totals straight from usage_records (billing's query before usage_daily)."""
    periods = (
        "unnest(CAST(:pids AS integer[]), CAST(:orgs AS uuid[]), CAST(:starts AS timestamptz[]),"
        " CAST(:ends AS timestamptz[])) AS p(pid, organization_id, period_start, period_end)"
    )
    joined = (
        f"FROM {periods} JOIN usage_records u ON u.organization_id = p.organization_id"
        " AND u.window_start >= p.period_start AND u.window_start < p.period_end"
    )
    params = {
        "pids": list(range(len(queries))),
        "orgs": [q.organization_id for q in queries],
        "starts": [q.start for q in queries],
        "ends": [q.end for q in queries],
    }
    sums = connection.execute(
        sa.text(f"SELECT p.pid, u.metric, sum(u.quantity) AS q {joined} GROUP BY p.pid, u.metric"),
        params,
    )
    maxima = connection.execute(
        sa.text(
            "SELECT pid, metric, max(q) AS q FROM (SELECT p.pid, u.metric, sum(u.quantity) AS q"
            f" {joined} GROUP BY p.pid, u.metric, u.window_start) AS w GROUP BY pid, metric"
        ),
        params,
    )
    by_sum = {(row.pid, row.metric): row.q for row in sums}
    by_max = {(row.pid, row.metric): row.q for row in maxima}
    totals: list[dict[str, Decimal]] = [{} for _ in queries]
    for pid, query in enumerate(queries):
        for metric in query.metrics:
            source = by_max if metric in query.max_metrics else by_sum
            if (pid, metric) in source:
                totals[pid][metric] = source[(pid, metric)]
    return totals


def _rollup(connection: Connection, world: World) -> dict[tuple[object, ...], tuple[object, ...]]:
    """The world's usage_daily rows (other tests' organizations share the database)."""
    rows = connection.execute(
        sa.text(
            "SELECT organization_id, metric, window_seconds, day, quantity, max_window_quantity,"
            " event_count FROM usage_daily WHERE organization_id = ANY(:orgs)"
        ),
        {"orgs": world.organizations},
    )
    return {tuple(row[:4]): tuple(row[4:]) for row in rows}


def _rollup_from_records(
    connection: Connection, world: World
) -> dict[tuple[object, ...], tuple[object, ...]]:
    rows = connection.execute(
        sa.text(
            "SELECT organization_id, metric, window_seconds, day, sum(q), max(q), sum(n) FROM ("
            " SELECT organization_id, metric, window_seconds,"
            " (window_start AT TIME ZONE 'UTC')::date AS day, window_start,"
            " sum(quantity) AS q, sum(event_count) AS n FROM usage_records"
            " WHERE organization_id = ANY(:orgs)"
            " GROUP BY 1, 2, 3, 4, 5) AS w GROUP BY 1, 2, 3, 4"
        ),
        {"orgs": world.organizations},
    )
    return {tuple(row[:4]): tuple(row[4:]) for row in rows}


def _monthly(connection: Connection, world: World) -> dict[tuple[object, ...], tuple[object, ...]]:
    rows = connection.execute(
        sa.text(
            "SELECT organization_id, metric, month, quantity, event_count, daily_rows"
            " FROM usage_monthly WHERE organization_id = ANY(:orgs)"
        ),
        {"orgs": world.organizations},
    )
    return {tuple(row[:3]): tuple(row[3:]) for row in rows}


def _monthly_from_records(
    connection: Connection, world: World
) -> dict[tuple[object, ...], tuple[object, ...]]:
    """Per organization, metric and UTC month of window starts: the sums, and how many
    (window size, day) pairs hold usage."""
    rows = connection.execute(
        sa.text(
            "SELECT organization_id, metric,"
            " date_trunc('month', window_start AT TIME ZONE 'UTC')::date AS month,"
            " sum(quantity), sum(event_count),"
            " count(DISTINCT (window_seconds, (window_start AT TIME ZONE 'UTC')::date))"
            " FROM usage_records WHERE organization_id = ANY(:orgs) GROUP BY 1, 2, 3"
        ),
        {"orgs": world.organizations},
    )
    return {tuple(row[:3]): tuple(row[3:]) for row in rows}


def _assert_exact(connection: Connection, world: World) -> None:
    assert _rollup(connection, world) == _rollup_from_records(connection, world)
    assert _monthly(connection, world) == _monthly_from_records(connection, world)
    queries = _queries(world)
    assert segment_totals(connection, queries, {}) == _reference_totals(connection, queries)


def test_rollup_and_period_totals_equal_usage_records_after_aggregator_writes(
    db: Session, world: World
) -> None:
    connection = db.connection()
    rollup = _rollup(connection, world)

    # Per organization and metric: 5 hourly days, 1 minute day, 1 daily-window day.
    assert len(rollup) == 3 * len(METRICS) * 7
    assert {window_seconds for _, _, window_seconds, _ in rollup} == {60, 3600, 86400}
    _assert_exact(connection, world)


def test_replay_style_replace_and_delete_keep_rollup_exact(db: Session, world: World) -> None:
    connection = db.connection()
    organization_id = world.organizations[0]
    project_id, api_key_id = world.scopes[organization_id][2]
    day_two = START + timedelta(days=1)
    windows = [
        UsageWindow(
            organization_id, project_id, api_key_id, metric, day_two + timedelta(hours=h), 3600
        )
        for metric in METRICS
        for h in range(0, 24, 2)
    ]
    replaced = [
        UsageDelta(
            w.organization_id,
            w.project_id,
            w.api_key_id,
            w.metric,
            w.window_start,
            w.window_seconds,
            quantity=Decimal("12345.678"),
            event_count=7,
        )
        for w in windows[::3]
    ]
    before = _rollup(connection, world)

    set_usage(connection, replaced)
    delete_usage(connection, windows[1::3])

    assert _rollup(connection, world) != before
    _assert_exact(connection, world)


def test_manual_update_moving_and_changing_windows_keeps_rollup_exact(
    db: Session, world: World
) -> None:
    connection = db.connection()
    organization_id = world.organizations[1]

    connection.execute(
        sa.text(
            "UPDATE usage_records SET quantity = quantity * 3 + 1"
            " WHERE organization_id = :org AND metric = 'seats'"
        ),
        {"org": organization_id},
    )
    # Moves a day's windows to a day that had none: the old day must lose them.
    connection.execute(
        sa.text(
            "UPDATE usage_records SET window_start = window_start + interval '20 days'"
            " WHERE organization_id = :org AND metric = 'api_calls'"
            " AND window_start >= :day AND window_start < :day + interval '1 day'"
        ),
        {"org": organization_id, "day": START + timedelta(days=4)},
    )

    _assert_exact(connection, world)


def test_moving_windows_into_another_month_and_back_keeps_both_months_exact(
    db: Session, world: World
) -> None:
    connection = db.connection()
    organization_id = world.organizations[0]
    moved = (
        "UPDATE usage_records SET window_start = window_start + CAST(:shift AS interval)"
        " WHERE organization_id = :org AND metric = 'storage_gb' AND window_start >= :from"
        " AND window_start < :from + interval '2 days'"
    )

    connection.execute(sa.text(moved), {"shift": "30 days", "org": organization_id, "from": START})
    months = {key[2] for key in _monthly(connection, world) if key[0] == organization_id}
    assert months == {START.date(), (START + timedelta(days=30)).date()}
    _assert_exact(connection, world)

    connection.execute(
        sa.text(moved),
        {"shift": "-30 days", "org": organization_id, "from": START + timedelta(days=30)},
    )
    _assert_exact(connection, world)


def test_deleting_a_months_usage_removes_its_monthly_row(db: Session, world: World) -> None:
    connection = db.connection()
    organization_id = world.organizations[1]

    connection.execute(
        sa.text("DELETE FROM usage_records WHERE organization_id = :org AND metric = 'seats'"),
        {"org": organization_id},
    )

    assert (organization_id, "seats", START.date()) not in _monthly(connection, world)
    assert (organization_id, "api_calls", START.date()) in _monthly(connection, world)
    _assert_exact(connection, world)


def test_rebuilding_the_rollups_after_a_load_without_triggers_makes_them_exact(
    db: Session, world: World
) -> None:
    connection = db.connection()
    connection.execute(sa.text("ALTER TABLE usage_records DISABLE TRIGGER USER"))
    connection.execute(
        sa.text("UPDATE usage_records SET quantity = quantity + 1 WHERE organization_id = :org"),
        {"org": world.organizations[2]},
    )
    connection.execute(sa.text("ALTER TABLE usage_records ENABLE TRIGGER USER"))
    assert _monthly(connection, world) != _monthly_from_records(connection, world)

    connection.execute(sa.text("SELECT usage_daily_rebuild()"))

    _assert_exact(connection, world)


def test_deleting_a_whole_day_removes_its_rollup_rows(db: Session, world: World) -> None:
    connection = db.connection()
    organization_id = world.organizations[2]
    day = START + timedelta(days=1)

    connection.execute(
        sa.text(
            "DELETE FROM usage_records WHERE organization_id = :org"
            " AND window_start >= :day AND window_start < :day + interval '1 day'"
        ),
        {"org": organization_id, "day": day},
    )

    days = {key[3] for key in _rollup(connection, world) if key[0] == organization_id}
    assert day.date() not in days
    assert (day + timedelta(days=1)).date() in days
    _assert_exact(connection, world)


def test_deleting_an_organization_removes_its_rollup_and_keeps_the_others(
    db: Session, world: World
) -> None:
    connection = db.connection()
    gone = world.organizations[0]

    db.delete(db.get(Organization, gone))
    db.flush()

    assert all(key[0] != gone for key in _rollup(connection, world))
    assert any(key[0] == world.organizations[1] for key in _rollup(connection, world))
    _assert_exact(connection, world)
