"""Usage recording (upsert) and querying by metric, project, key and granularity."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

from sqlalchemy.orm import Session

from shared.models import Role
from shared.usage import (
    UsageDelta,
    UsageWindow,
    delete_usage,
    query_usage,
    record_usage,
    set_usage,
    usage_totals,
)
from shared.usage_overview import usage_overview
from tests import factories

T0 = datetime(2026, 11, 24, 0, tzinfo=UTC)
NOW = datetime(2026, 12, 2, 12, tzinfo=UTC)


def test_upsert_adds_to_existing_windows_including_null_project_and_key(db: Session) -> None:
    org = factories.make_organization(db)
    delta = UsageDelta(org.id, None, None, "api_calls", T0, 3600, Decimal("1.5"), 1)
    record_usage(db, [delta, delta])
    record_usage(db, [delta])
    rows = query_usage(db, org.id, start=T0, end=T0 + timedelta(hours=1))
    assert [(r.quantity, r.event_count) for r in rows] == [(Decimal("4.5"), 3)]


def test_query_groups_and_buckets(db: Session) -> None:
    org = factories.make_organization(db)
    web = factories.make_project(db, org)
    app = factories.make_project(db, org)
    record_usage(
        db,
        [
            UsageDelta(org.id, web.id, None, "api_calls", T0, 3600, Decimal(2), 2),
            UsageDelta(
                org.id, web.id, None, "api_calls", T0 + timedelta(hours=1), 3600, Decimal(3), 3
            ),
            UsageDelta(org.id, app.id, None, "api_calls", T0, 3600, Decimal(5), 1),
            UsageDelta(org.id, app.id, None, "storage_gb", T0, 3600, Decimal("0.25"), 1),
            UsageDelta(
                org.id, app.id, None, "api_calls", T0 + timedelta(days=1), 3600, Decimal(7), 1
            ),
        ],
    )
    hourly = query_usage(db, org.id, start=T0, end=T0 + timedelta(days=1))
    assert [(r.start, r.metric, r.quantity) for r in hourly] == [
        (T0, "api_calls", Decimal(7)),
        (T0, "storage_gb", Decimal("0.25")),
        (T0 + timedelta(hours=1), "api_calls", Decimal(3)),
    ]
    daily = query_usage(
        db, org.id, start=T0, end=T0 + timedelta(days=2), granularity="day", metric="api_calls"
    )
    assert [(r.start, r.quantity, r.event_count) for r in daily] == [
        (T0, Decimal(10), 6),
        (T0 + timedelta(days=1), Decimal(7), 1),
    ]
    by_project = query_usage(
        db, org.id, start=T0, end=T0 + timedelta(hours=1), group_by="project", metric="api_calls"
    )
    assert {r.project_id: r.quantity for r in by_project} == {
        web.id: Decimal(2),
        app.id: Decimal(5),
    }
    assert usage_totals(db, org.id, start=T0, end=T0 + timedelta(days=2)) == {
        "api_calls": Decimal(17),
        "storage_gb": Decimal("0.25"),
    }


def test_query_never_returns_another_organizations_usage(db: Session) -> None:
    mine = factories.make_organization(db)
    theirs = factories.make_organization(db)
    record_usage(db, [UsageDelta(theirs.id, None, None, "api_calls", T0, 3600, Decimal(9), 9)])
    assert query_usage(db, mine.id, start=T0, end=T0 + timedelta(days=1)) == []


def test_set_usage_replaces_totals_including_null_project_and_key_and_adds_new_windows(
    db: Session,
) -> None:
    org = factories.make_organization(db)
    project = factories.make_project(db, org)
    record_usage(
        db,
        [
            UsageDelta(org.id, None, None, "api_calls", T0, 3600, Decimal(40), 4),
            UsageDelta(org.id, project.id, None, "api_calls", T0, 3600, Decimal(9), 9),
        ],
    )

    written = set_usage(
        db,
        [
            UsageDelta(org.id, None, None, "api_calls", T0, 3600, Decimal("2.5"), 2),
            UsageDelta(
                org.id, None, None, "api_calls", T0 + timedelta(hours=1), 3600, Decimal(1), 1
            ),
        ],
    )

    rows = query_usage(db, org.id, start=T0, end=T0 + timedelta(hours=2), group_by="project")
    assert written == 2
    assert {(r.start, r.project_id): (r.quantity, r.event_count) for r in rows} == {
        (T0, None): (Decimal("2.5"), 2),
        (T0, project.id): (Decimal(9), 9),
        (T0 + timedelta(hours=1), None): (Decimal(1), 1),
    }


def test_delete_usage_removes_only_the_named_windows(db: Session) -> None:
    org = factories.make_organization(db)
    project = factories.make_project(db, org)
    record_usage(
        db,
        [
            UsageDelta(org.id, None, None, "api_calls", T0, 3600, Decimal(1), 1),
            UsageDelta(org.id, project.id, None, "api_calls", T0, 3600, Decimal(2), 2),
            UsageDelta(org.id, None, None, "api_calls", T0, 86400, Decimal(3), 3),
        ],
    )

    deleted = delete_usage(db, [UsageWindow(org.id, None, None, "api_calls", T0, 3600)])

    assert deleted == 1
    assert usage_totals(db, org.id, start=T0, end=T0 + timedelta(days=1)) == {
        "api_calls": Decimal(5)
    }


def test_daily_totals_are_those_of_the_hours_for_whole_and_partial_days(db: Session) -> None:
    """Whole days come from the daily rollup and the partial days at a range's ends from the
    windows: every range, aligned or not, in UTC or another offset, gives the hours' sums."""
    org = factories.make_organization(db)
    project = factories.make_project(db, org)
    deltas = [
        UsageDelta(
            org.id, project.id if h % 3 else None, None, ("api_calls", "storage_gb")[h % 2],
            T0 + timedelta(hours=h * 5), 3600, Decimal(h) + Decimal("0.25"), h + 1,
        )
        for h in range(20)
    ]  # fmt: skip
    record_usage(db, deltas)
    # A replay's rewrite and removal reach the rollup too (its triggers recompute the day).
    set_usage(db, [UsageDelta(org.id, None, None, "api_calls", T0, 3600, Decimal(100), 50)])
    delete_usage(db, [UsageWindow(org.id, project.id, None, "storage_gb", deltas[5].window_start,
                                  3600)])  # fmt: skip
    plus_two = timezone(timedelta(hours=2))
    ranges = [
        (T0, T0 + timedelta(days=5)),
        (T0 + timedelta(hours=7), T0 + timedelta(days=3, hours=2)),
        (T0 + timedelta(hours=7), T0 + timedelta(hours=20)),
        (T0 + timedelta(days=1), T0 + timedelta(days=2)),
        (T0.astimezone(plus_two) + timedelta(hours=1), T0.astimezone(plus_two) + timedelta(days=4)),
    ]
    for start, end in ranges:
        for metric in (None, "api_calls"):
            hours = query_usage(db, org.id, start=start, end=end, metric=metric)
            by_day: dict[tuple[datetime, str | None], tuple[Decimal, int]] = {}
            for r in hours:
                day = r.start.astimezone(UTC).replace(hour=0)
                quantity, events = by_day.get((day, r.metric), (Decimal(0), 0))
                by_day[(day, r.metric)] = (quantity + r.quantity, events + r.event_count)
            days = query_usage(db, org.id, start=start, end=end, metric=metric, granularity="day")
            assert [((r.start, r.metric), (r.quantity, r.event_count)) for r in days] == sorted(
                by_day.items()
            ), (start, end, metric)
    whole = query_usage(db, org.id, start=T0, end=T0 + timedelta(days=1), granularity="day")
    assert [(r.start, r.metric, r.quantity, r.event_count) for r in whole] == [
        (T0, "api_calls", Decimal(100) + Decimal("2.25") + Decimal("4.25"), 50 + 3 + 5),
        (T0, "storage_gb", Decimal("1.25") + Decimal("3.25"), 2 + 4),
    ]  # fmt: skip


def test_daily_totals_of_a_scoped_reader_hold_only_its_project_or_its_keys(db: Session) -> None:
    """The daily rollup holds no project or key: a reader limited to a project or to a
    member's keys gets whole days from its own windows, never the organization's day totals."""
    org = factories.make_organization(db)
    project = factories.make_project(db, org)
    member = factories.add_member(db, org, Role.MEMBER)
    own_key = factories.make_api_key(db, org, user=member).key
    other_key = factories.make_api_key(db, org, project=project).key
    record_usage(
        db,
        [
            UsageDelta(org.id, project.id, other_key.id, "api_calls", T0, 3600, Decimal(5), 1),
            UsageDelta(org.id, None, own_key.id, "api_calls", T0, 3600, Decimal(7), 2),
            UsageDelta(org.id, None, None, "api_calls", T0, 3600, Decimal(11), 3),
        ],
    )
    end = T0 + timedelta(days=1)
    scopes: list[tuple[uuid.UUID | None, uuid.UUID | None, tuple[Decimal, int]]] = [
        (None, None, (Decimal(23), 6)),
        (project.id, None, (Decimal(5), 1)),
        (None, member.id, (Decimal(7), 2)),
    ]
    for project_id, keys_of_user, expected in scopes:
        rows = query_usage(
            db, org.id, start=T0, end=end, granularity="day",
            project_id=project_id, keys_of_user=keys_of_user,
        )  # fmt: skip
        assert [(r.start, r.quantity, r.event_count) for r in rows] == [(T0, *expected)]


def test_overview_pages_organizations_largest_first_with_the_count_and_the_days(
    db: Session,
) -> None:
    day0 = datetime(2001, 3, 4, tzinfo=UTC)  # a range no other test writes to
    small, large = factories.make_organization(db), factories.make_organization(db)
    record_usage(
        db,
        [
            UsageDelta(small.id, None, None, "api_calls", day0, 3600, Decimal(1), 1),
            UsageDelta(large.id, None, None, "api_calls", day0 + timedelta(hours=30), 3600,
                       Decimal(5), 2),
            UsageDelta(large.id, None, None, "storage_gb", day0, 3600, Decimal("0.5"), 1),
            UsageDelta(large.id, None, None, "api_calls", day0 + timedelta(days=3), 3600,
                       Decimal(100), 1),  # after the range
        ],
    )  # fmt: skip
    start, end = day0.date(), (day0 + timedelta(days=2)).date()

    found = usage_overview(db, start=start, end=end, now=NOW, limit=2)
    assert found.total == 3
    assert [(r.organization_slug, r.metric, r.quantity, r.event_count) for r in found.items] == [
        (large.slug, "api_calls", Decimal(5), 2),
        (small.slug, "api_calls", Decimal(1), 1),
    ]
    assert [(d.day, d.metric, d.quantity, d.event_count) for d in found.daily] == [
        (day0.date(), "api_calls", Decimal(1), 1),
        (day0.date(), "storage_gb", Decimal("0.5"), 1),
        ((day0 + timedelta(days=1)).date(), "api_calls", Decimal(5), 2),
    ]
    past_the_end = usage_overview(db, start=start, end=end, now=NOW, limit=2, offset=4)
    assert (past_the_end.items, past_the_end.total) == ([], 3)
    storage = usage_overview(db, start=start, end=end, now=NOW, metric="storage_gb")
    assert [(r.organization_id, r.quantity) for r in storage.items] == [(large.id, Decimal("0.5"))]
    assert storage.total == 1
