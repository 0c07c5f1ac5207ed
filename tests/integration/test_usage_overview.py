"""The usage overview, read from whole months and signed runs of days of the rollups, equals the
sums of usage_records over the same UTC days: per organization and metric, in count, per day."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.usage import UsageDelta, delete_usage, record_usage, set_usage
from shared.usage import UsageWindow as Window
from shared.usage_overview import range_parts, usage_overview
from tests import factories

# A stretch of days no other test writes to, across three month boundaries.
FIRST = datetime(2003, 1, 20, tzinfo=UTC)
DAYS = 75
METRICS = ("api_calls", "storage_gb", "seats")


def _usage(organizations: list[uuid.UUID], rng: random.Random) -> list[UsageDelta]:
    """Hourly windows on most days (none on some), minute windows on some, with quantities of
    up to four decimals; some windows are zero (a day of usage that sums to nothing)."""
    deltas = []
    for organization_id in organizations:
        for metric in METRICS:
            for day in range(DAYS):
                if rng.random() < 0.15:
                    continue
                size = 60 if day % 11 == 0 else 3600
                for hour in rng.sample(range(24), 3):
                    start = FIRST + timedelta(days=day, hours=hour)
                    quantity = Decimal(rng.randrange(0, 10**6)) / 10 ** rng.randrange(0, 5)
                    deltas.append(
                        UsageDelta(
                            organization_id, None, None, metric, start, size,
                            quantity if rng.random() > 0.05 else Decimal(0), rng.randrange(1, 9),
                        )
                    )  # fmt: skip
    return deltas


@pytest.fixture
def organizations(db: Session) -> list[uuid.UUID]:
    made = [factories.make_organization(db) for _ in range(4)]
    db.flush()
    ids = [o.id for o in made]
    deltas = _usage(ids, random.Random(20030120))
    for part in range(3):
        record_usage(db, deltas[part::3])
    return ids


def _expected(db: Session, start: date, end: date, metric: str | None) -> tuple[dict, dict]:
    """Per (organization, metric) and per (day, metric): sums straight from usage_records."""
    bounds = {"start": start, "end": end, "metric": metric}
    where = (
        " FROM usage_records WHERE window_start >= CAST(:start AS timestamp) AT TIME ZONE 'UTC'"
        " AND window_start < CAST(:end AS timestamp) AT TIME ZONE 'UTC'"
        " AND (CAST(:metric AS text) IS NULL OR metric = :metric)"
    )
    pairs = db.execute(
        sa.text(f"SELECT organization_id, metric, sum(quantity), sum(event_count){where}"
                " GROUP BY 1, 2"), bounds,
    )  # fmt: skip
    days = db.execute(
        sa.text("SELECT (window_start AT TIME ZONE 'UTC')::date, metric, sum(quantity),"
                f" sum(event_count){where} GROUP BY 1, 2"), bounds,
    )  # fmt: skip
    return (
        {(r[0], r[1]): (Decimal(r[2]), int(r[3])) for r in pairs},
        {(r[0], r[1]): (Decimal(r[2]), int(r[3])) for r in days},
    )


def _assert_overview_is_exact(
    db: Session, start: date, end: date, now: datetime, metric: str | None = None
) -> None:
    found = usage_overview(db, start=start, end=end, now=now, metric=metric, limit=1000)
    pairs, days = _expected(db, start, end, metric)

    assert {(r.organization_id, r.metric): (r.quantity, r.event_count) for r in found.items} == (
        pairs
    )
    assert found.total == len(pairs)
    assert [r.quantity for r in found.items] == sorted((r.quantity for r in found.items),
                                                       reverse=True)  # fmt: skip
    assert {(d.day, d.metric): (d.quantity, d.event_count) for d in found.daily} == days


# (start, end, now): 30 days ending tomorrow (a month less a day and this month's days), ranges
# with a month read less its days at either end or at both, whole months, days inside one month,
# a range before and past all usage, and one day.
RANGES = [
    (date(2003, 2, 2), date(2003, 3, 5), datetime(2003, 3, 4, 12, tzinfo=UTC)),
    (date(2003, 1, 22), date(2003, 3, 29), datetime(2003, 3, 28, 23, 58, tzinfo=UTC)),
    (date(2003, 2, 3), date(2003, 3, 1), datetime(2026, 12, 2, tzinfo=UTC)),
    (date(2003, 2, 1), date(2003, 2, 27), datetime(2026, 12, 2, tzinfo=UTC)),
    (date(2003, 3, 3), date(2003, 3, 29), datetime(2026, 12, 2, tzinfo=UTC)),
    (date(2003, 2, 1), date(2003, 4, 1), datetime(2026, 12, 2, tzinfo=UTC)),
    (date(2003, 3, 10), date(2003, 3, 14), datetime(2026, 12, 2, tzinfo=UTC)),
    (date(2002, 12, 1), date(2003, 5, 1), datetime(2003, 4, 5, tzinfo=UTC)),
    (date(2003, 3, 31), date(2003, 4, 1), datetime(2003, 3, 31, tzinfo=UTC)),
]


@pytest.mark.parametrize(("start", "end", "now"), RANGES)
def test_overview_equals_usage_records_over_the_same_days(
    db: Session, organizations: list[uuid.UUID], start: date, end: date, now: datetime
) -> None:
    _assert_overview_is_exact(db, start, end, now)


@pytest.mark.parametrize(("start", "end", "now"), [RANGES[0], RANGES[5]])
def test_overview_of_one_metric_equals_its_usage_records(
    db: Session, organizations: list[uuid.UUID], start: date, end: date, now: datetime
) -> None:
    _assert_overview_is_exact(db, start, end, now, metric="seats")


def test_the_ranges_read_months_less_days(organizations: list[uuid.UUID]) -> None:
    """The cases above do take the months-less-days path (the benchmark's 30 days among them)."""
    subtracted = [range_parts(s, e, n.date()) for s, e, n in RANGES]
    assert sum(1 for p in subtracted if any(sign < 0 for _, _, sign in p.days)) >= 3


def test_overview_stays_exact_after_usage_is_replaced_and_deleted(
    db: Session, organizations: list[uuid.UUID]
) -> None:
    start, end, now = date(2003, 2, 2), date(2003, 3, 5), datetime(2003, 3, 4, tzinfo=UTC)
    rows = db.execute(
        sa.text(
            "SELECT organization_id, metric, window_start, window_seconds FROM usage_records"
            " WHERE organization_id = ANY(:orgs) AND window_start >= :a AND window_start < :b"
        ),
        {"orgs": organizations, "a": FIRST + timedelta(days=12), "b": FIRST + timedelta(days=14)},
    ).all()
    windows = [Window(r[0], None, None, r[1], r[2], r[3]) for r in rows]

    # As replay rewrites a range: some windows set to new totals, the others deleted; and the
    # whole 1st of February goes (the day the first range reads February less).
    set_usage(
        db,
        [
            UsageDelta(w.organization_id, None, None, w.metric, w.window_start, w.window_seconds,
                       Decimal("0.001"), 1)
            for w in windows[::2]
        ],
    )  # fmt: skip
    delete_usage(db, windows[1::2])
    db.execute(
        sa.text(
            "DELETE FROM usage_records WHERE organization_id = ANY(:orgs)"
            " AND window_start >= '2003-02-01T00:00:00Z' AND window_start < '2003-02-02T00:00:00Z'"
        ),
        {"orgs": organizations},
    )

    _assert_overview_is_exact(db, start, end, now)
    _assert_overview_is_exact(db, date(2003, 2, 1), date(2003, 2, 28), now)


def test_a_pair_whose_usage_is_all_outside_the_range_is_not_listed(
    db: Session, organizations: list[uuid.UUID]
) -> None:
    """February read as the month less its first two days: an organization whose February
    usage is all on those days sums to nothing there and is no pair of the range."""
    only_early = factories.make_organization(db)
    db.flush()
    record_usage(
        db,
        [UsageDelta(only_early.id, None, None, "exports", datetime(2003, 2, 1, 5, tzinfo=UTC),
                    3600, Decimal(3), 1)],
    )  # fmt: skip
    start, end, now = date(2003, 2, 3), date(2003, 3, 1), datetime(2026, 12, 2, tzinfo=UTC)
    assert any(sign < 0 for _, _, sign in range_parts(start, end, now.date()).days)

    found = usage_overview(db, start=start, end=end, now=now, limit=1000)

    assert all(r.organization_id != only_early.id for r in found.items)
    _assert_overview_is_exact(db, start, end, now)
