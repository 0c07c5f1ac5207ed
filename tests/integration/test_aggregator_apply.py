"""A batch applied to real PostgreSQL: the ledger counts each (organization, event id) once."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.aggregator.ledger_partitions import (
    create_partitions,
    drop_partitions_before,
    existing_partitions,
    ledger_cutoff,
    ledger_floor,
    maintain_ledger,
    month_start,
    next_month,
    partition_name,
    prune_cutoff,
)
from services.aggregator.service import BatchApplier
from shared.events import UsageEvent, decode_envelope
from shared.settings import Settings
from tests.aggregator_support import (
    envelope_bytes,
    event,
    fresh_database,
    make_tenant,
    record,
    totals,
    windows,
)

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def applier(engine: Engine, settings: Settings) -> BatchApplier:
    return BatchApplier(engine, settings)


def test_same_batch_applied_twice_counts_once(engine: Engine, applier: BatchApplier) -> None:
    tenant = make_tenant(engine)
    batch = [
        record(
            envelope_bytes(
                tenant.organization_id,
                [event("a", timestamp=NOW), event("b", quantity=2, timestamp=NOW)],
            )
        )
    ]

    first = applier.apply(batch)
    second = applier.apply(batch)

    assert (first.counted, second.counted, second.duplicates) == (2, 0, 2)
    assert totals(engine, tenant.organization_id) == (Decimal(3), 2)


def test_duplicate_ids_inside_one_batch_count_once(engine: Engine, applier: BatchApplier) -> None:
    tenant = make_tenant(engine)
    org = tenant.organization_id
    batch = [
        record(envelope_bytes(org, [event("x", timestamp=NOW), event("x", timestamp=NOW)])),
        record(envelope_bytes(org, [event("x", timestamp=NOW), event("y", timestamp=NOW)])),
    ]

    result = applier.apply(batch)

    assert (result.counted, result.duplicates) == (2, 2)
    assert totals(engine, org) == (Decimal(2), 2)


def test_same_event_id_in_two_organizations_counts_in_each(
    engine: Engine, applier: BatchApplier
) -> None:
    one, two = make_tenant(engine), make_tenant(engine)

    applier.apply(
        [
            record(envelope_bytes(one.organization_id, [event("shared", timestamp=NOW)])),
            record(envelope_bytes(two.organization_id, [event("shared", timestamp=NOW)])),
        ]
    )

    assert totals(engine, one.organization_id) == (Decimal(1), 1)
    assert totals(engine, two.organization_id) == (Decimal(1), 1)


def test_conflicting_duplicate_is_not_counted_and_is_dead_lettered(
    engine: Engine, applier: BatchApplier
) -> None:
    tenant = make_tenant(engine)
    org = tenant.organization_id
    applier.apply([record(envelope_bytes(org, [event("c", quantity=5, timestamp=NOW)]))])

    result = applier.apply([record(envelope_bytes(org, [event("c", quantity=7, timestamp=NOW)]))])

    assert result.conflicts == 1
    assert [letter.code for letter in result.dead_letters] == ["conflicting_duplicate"]
    assert totals(engine, org) == (Decimal(5), 1)


def test_conflict_with_another_timestamp_is_caught_across_windows(
    engine: Engine, applier: BatchApplier
) -> None:
    tenant = make_tenant(engine)
    org = tenant.organization_id
    applier.apply([record(envelope_bytes(org, [event("t", timestamp=NOW)]))])

    result = applier.apply(
        [
            record(
                envelope_bytes(
                    org, [event("t", timestamp=NOW - timedelta(days=3))], received_at=NOW
                )
            )
        ]
    )

    assert result.conflicts == 1
    assert totals(engine, org) == (Decimal(1), 1)


def test_late_event_updates_the_window_it_belongs_to(
    engine: Engine, applier: BatchApplier, settings: Settings
) -> None:
    tenant = make_tenant(engine)
    org = tenant.organization_id
    late = NOW - timedelta(days=20)

    applier.apply([record(envelope_bytes(org, [event("now", timestamp=NOW)]))])
    applier.apply(
        [record(envelope_bytes(org, [event("late", quantity=4, timestamp=late)], received_at=NOW))]
    )

    late_window = datetime.fromtimestamp(
        int(late.timestamp()) // settings.window_seconds * settings.window_seconds, tz=UTC
    )
    assert windows(engine, org)[(None, None, "api_calls", late_window)] == (Decimal(4), 1)


def test_projects_keys_and_metrics_get_their_own_windows(
    engine: Engine, applier: BatchApplier
) -> None:
    tenant = make_tenant(engine, projects=2, keys=2)
    org = tenant.organization_id
    p1, p2 = tenant.project_ids
    k1, k2 = tenant.key_ids
    applier.apply(
        [
            record(envelope_bytes(org, [event("1", timestamp=NOW, project_id=p1)], api_key_id=k1)),
            record(envelope_bytes(org, [event("2", timestamp=NOW, project_id=p2)], api_key_id=k1)),
            record(envelope_bytes(org, [event("3", timestamp=NOW, project_id=p1)], api_key_id=k2)),
            record(
                envelope_bytes(
                    org,
                    [event("4", timestamp=NOW, metric="storage_gb", quantity="0.5")],
                    api_key_id=k2,
                )
            ),
            record(envelope_bytes(org, [event("5", timestamp=NOW, project_id=p1)], api_key_id=k1)),
        ]
    )

    by_key = {(k[0], k[1], k[2]): v for k, v in windows(engine, org).items()}
    assert by_key == {
        (p1, k1, "api_calls"): (Decimal(2), 2),
        (p2, k1, "api_calls"): (Decimal(1), 1),
        (p1, k2, "api_calls"): (Decimal(1), 1),
        (None, k2, "storage_gb"): (Decimal("0.5"), 1),
    }


def test_unknown_organization_is_dead_lettered_and_the_rest_is_counted(
    engine: Engine, applier: BatchApplier
) -> None:
    import uuid

    tenant = make_tenant(engine)
    stranger = uuid.uuid4()

    result = applier.apply(
        [
            record(envelope_bytes(stranger, [event("s", timestamp=NOW)])),
            record(envelope_bytes(tenant.organization_id, [event("ok", timestamp=NOW)])),
        ]
    )

    assert [letter.code for letter in result.dead_letters] == ["unknown_reference"]
    assert str(stranger) in result.dead_letters[0].reason
    assert totals(engine, tenant.organization_id) == (Decimal(1), 1)


def test_project_of_another_organization_is_dead_lettered(
    engine: Engine, applier: BatchApplier
) -> None:
    mine, theirs = make_tenant(engine), make_tenant(engine)

    result = applier.apply(
        [
            record(
                envelope_bytes(
                    mine.organization_id,
                    [event("p", timestamp=NOW, project_id=theirs.project_ids[0])],
                )
            )
        ]
    )

    assert [letter.code for letter in result.dead_letters] == ["unknown_reference"]
    assert totals(engine, mine.organization_id) == (Decimal(0), 0)


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"not json", "malformed"),
        (b'{"v": 9, "organization_id": "x"}', "unknown_version"),
        (
            b'{"v": 1, "organization_id": "00000000-0000-0000-0000-000000000001",'
            b' "api_key_id": null,'
            b' "received_at": "2026-11-24T10:00:00Z", "events": [{"id": "n", "metric": "api_calls",'
            b' "quantity": "-1", "timestamp": "2026-11-24T10:00:00Z"}]}',
            "malformed",
        ),
    ],
)
def test_unreadable_envelope_is_dead_lettered_and_the_next_is_counted(
    engine: Engine, applier: BatchApplier, value: bytes, code: str
) -> None:
    tenant = make_tenant(engine)

    result = applier.apply(
        [
            record(value),
            record(envelope_bytes(tenant.organization_id, [event("after", timestamp=NOW)])),
        ]
    )

    assert [letter.code for letter in result.dead_letters] == [code]
    assert result.dead_letters[0].payload == value
    assert totals(engine, tenant.organization_id) == (Decimal(1), 1)


def test_event_older_than_the_ledger_horizon_is_dead_lettered(
    engine: Engine, applier: BatchApplier, settings: Settings
) -> None:
    tenant = make_tenant(engine)
    old = NOW - settings.lateness_horizon - timedelta(days=5)

    result = applier.apply(
        [
            record(
                envelope_bytes(
                    tenant.organization_id,
                    [event("old", timestamp=old), event("new", timestamp=NOW)],
                    received_at=NOW,
                )
            )
        ]
    )

    assert [letter.code for letter in result.dead_letters] == ["too_old"]
    assert totals(engine, tenant.organization_id) == (Decimal(1), 1)


@pytest.fixture(scope="module")
def own_engine(database_url: str) -> Iterator[Engine]:
    with fresh_database(database_url) as fresh:
        yield fresh


def test_ledger_partitions_are_created_on_demand_and_old_ones_dropped(
    own_engine: Engine, settings: Settings
) -> None:
    later = datetime(2001, 6, 15, tzinfo=UTC)
    stale_month = month_start(later - timedelta(days=90))
    with own_engine.begin() as connection:
        create_partitions(connection, {stale_month})

    created, dropped = maintain_ledger(
        own_engine, later, cutoff=prune_cutoff(later, settings, None)
    )

    with own_engine.connect() as connection:
        names = {p.name for p in existing_partitions(connection)}
        floor = ledger_floor(connection)
    assert partition_name(month_start(later)) in names
    assert dropped == [partition_name(stale_month)]
    assert partition_name(stale_month) not in names
    assert floor == next_month(stale_month)
    assert created


def test_event_accepted_near_the_horizon_counts_after_an_outage_longer_than_the_grace(
    own_engine: Engine, settings: Settings
) -> None:
    now = datetime.now(UTC)
    received = now - timedelta(hours=settings.ledger_grace_hours + 24)
    edge = received - settings.lateness_horizon + timedelta(minutes=1)
    tenant = make_tenant(own_engine)

    result = BatchApplier(own_engine, settings).apply(
        [
            record(
                envelope_bytes(
                    tenant.organization_id, [event("edge", timestamp=edge)], received_at=received
                )
            )
        ]
    )

    assert result.dead_letters == []
    assert totals(own_engine, tenant.organization_id) == (Decimal(1), 1)


def test_prune_keeps_the_partition_a_backlogged_event_needs_and_the_event_counts(
    own_engine: Engine, settings: Settings
) -> None:
    boundary = datetime(2002, 3, 1, tzinfo=UTC)
    edge = boundary - timedelta(days=2)  # its month ends two days later
    received = edge + settings.lateness_horizon  # ingest accepted it at the horizon...
    later = received + timedelta(days=10)  # ...and the aggregator is ten days behind
    with own_engine.begin() as connection:
        create_partitions(connection, {month_start(edge)})
    tenant = make_tenant(own_engine)

    _, dropped = maintain_ledger(own_engine, later, cutoff=prune_cutoff(later, settings, received))
    result = BatchApplier(own_engine, settings).apply(
        [
            record(
                envelope_bytes(
                    tenant.organization_id, [event("late", timestamp=edge)], received_at=received
                )
            )
        ]
    )

    assert ledger_cutoff(later, settings) > boundary  # pruning by the clock would drop it
    assert partition_name(month_start(edge)) not in dropped
    assert result.dead_letters == []
    assert totals(own_engine, tenant.organization_id) == (Decimal(1), 1)


def test_event_of_a_force_pruned_month_is_dead_lettered_retryable_and_not_counted(
    own_engine: Engine, settings: Settings
) -> None:
    pruned = datetime(2003, 1, 15, tzinfo=UTC)
    kept = datetime(2003, 2, 15, tzinfo=UTC)
    with own_engine.begin() as connection:
        create_partitions(connection, {month_start(pruned), month_start(kept)})
        drop_partitions_before(connection, next_month(month_start(pruned)))
    tenant = make_tenant(own_engine)

    result = BatchApplier(own_engine, settings).apply(
        [
            record(
                envelope_bytes(
                    tenant.organization_id,
                    [event("gone", timestamp=pruned), event("here", timestamp=kept)],
                    received_at=kept,
                )
            )
        ]
    )

    assert [(d.code, d.retryable) for d in result.dead_letters] == [
        ("ledger_partition_missing", True)
    ]
    assert totals(own_engine, tenant.organization_id) == (Decimal(1), 1)


def test_window_of_1e12_and_1e_minus_12_is_stored_exactly(
    engine: Engine, applier: BatchApplier
) -> None:
    tenant = make_tenant(engine)
    org = tenant.organization_id

    applier.apply(
        [
            record(
                envelope_bytes(
                    org,
                    [
                        event("big", quantity="1000000000000", timestamp=NOW),
                        event("tiny", quantity="0.000000000001", timestamp=NOW),
                    ],
                )
            )
        ]
    )

    assert totals(engine, org) == (Decimal("1000000000000.000000000001"), 2)


def test_event_with_text_postgresql_cannot_store_is_dead_lettered_alone(
    engine: Engine, applier: BatchApplier
) -> None:
    """An envelope written before ingest checked text (or by another producer): the one event
    goes to the DLQ on its own, its request's other events and the rest of the batch count."""
    tenant = make_tenant(engine)
    org = tenant.organization_id
    batch = [
        record(
            envelope_bytes(
                org,
                [
                    event("a1", timestamp=NOW),
                    event("bad\x00id", quantity=5, timestamp=NOW),
                    event("a2", timestamp=NOW),
                ],
            )
        ),
        record(envelope_bytes(org, [event("b1", quantity=2, timestamp=NOW)])),
    ]

    result = applier.apply(batch)

    assert (result.counted, [d.code for d in result.dead_letters]) == (3, ["unstorable_text"])
    [letter] = result.dead_letters
    assert "U+0000" in letter.reason and not letter.retryable
    assert [e.id for e in decode_envelope(letter.payload).events] == ["bad\x00id"]
    assert totals(engine, org) == (Decimal(4), 3)


def test_events_the_database_refuses_are_dead_lettered_alone_and_the_rest_counts(
    own_engine: Engine, settings: Settings
) -> None:
    """Defence in depth: whatever the database refuses that the checks did not foresee (here a
    constraint added for the test) costs only the refused events, not their requests or batch."""
    with own_engine.begin() as connection:
        connection.execute(
            sa.text(
                "ALTER TABLE usage_event_ledger"
                " ADD CONSTRAINT refuse_poison CHECK (event_id NOT LIKE 'poison%')"
            )
        )
    tenant = make_tenant(own_engine)
    org = tenant.organization_id
    batch = [
        record(
            envelope_bytes(
                org,
                [
                    event("a1", timestamp=NOW),
                    event("poison-1", timestamp=NOW),
                    event("a2", quantity=2, timestamp=NOW),
                ],
            )
        ),
        record(envelope_bytes(org, [event("b1", quantity=3, timestamp=NOW)])),
        record(envelope_bytes(org, [event("poison-2", timestamp=NOW)])),
        record(envelope_bytes(org, [event("a1", timestamp=NOW), event("c1", timestamp=NOW)])),
    ]

    try:
        result = BatchApplier(own_engine, settings).apply(batch)
    finally:
        with own_engine.begin() as connection:
            connection.execute(
                sa.text("ALTER TABLE usage_event_ledger DROP CONSTRAINT refuse_poison")
            )

    assert (result.counted, result.duplicates) == (4, 1)
    refused = [(d.code, d.retryable) for d in result.dead_letters]
    assert refused == [("database_rejected", True)] * 2
    assert [decode_envelope(d.payload).events[0].id for d in result.dead_letters] == [
        "poison-1",
        "poison-2",
    ]
    assert all("refuse_poison" in d.reason for d in result.dead_letters)
    assert totals(own_engine, org) == (Decimal(7), 4)


def test_an_old_event_with_an_odd_property_counts_as_it_did(
    engine: Engine, applier: BatchApplier
) -> None:
    """Properties are not stored, so an event accepted before ingest checked them was counted
    then and counts the same when read again (a replay must not lose it)."""
    tenant = make_tenant(engine)
    odd = UsageEvent(
        id="odd-property",
        metric="api_calls",
        quantity=Decimal(2),
        timestamp=NOW,
        properties={"re\x00gion": "e\x00u"},
    )

    result = applier.apply([record(envelope_bytes(tenant.organization_id, [odd]))])

    assert (result.counted, result.dead_letters) == (1, [])
    assert totals(engine, tenant.organization_id) == (Decimal(2), 1)
