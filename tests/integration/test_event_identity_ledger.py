"""The identity rule against the real ledger: resends that ingest timed count once and never
conflict; a resend with other content the client sent is a conflicting duplicate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy.engine import Engine

from services.aggregator.service import BatchApplier
from shared.events import decode_envelope
from shared.settings import Settings
from tests.aggregator_support import envelope_bytes, event, make_tenant, record, totals

NOW = datetime.now(UTC) - timedelta(minutes=1)


@pytest.fixture
def applier(engine: Engine, settings: Settings) -> BatchApplier:
    return BatchApplier(engine, settings)


def test_resends_without_timestamp_in_later_batches_count_once_without_conflicts(
    engine: Engine, applier: BatchApplier
) -> None:
    tenant = make_tenant(engine)
    org = tenant.organization_id
    results = []
    for attempt in range(4):
        received = NOW + timedelta(seconds=attempt * 3, microseconds=attempt)
        events = [
            event(f"u{i}", quantity=2, timestamp=received, timestamp_defaulted=True)
            for i in range(5)
        ]
        results.append(applier.apply([record(envelope_bytes(org, events, received_at=received))]))

    assert [r.counted for r in results] == [5, 0, 0, 0]
    assert sum(r.duplicates for r in results) == 15
    assert sum(r.conflicts for r in results) == 0
    assert all(not r.dead_letters for r in results)
    assert totals(engine, org) == (Decimal(10), 5)


def test_resend_without_timestamp_after_one_with_a_timestamp_is_a_duplicate(
    engine: Engine, applier: BatchApplier
) -> None:
    tenant = make_tenant(engine)
    org = tenant.organization_id
    told = NOW - timedelta(hours=5)
    applier.apply([record(envelope_bytes(org, [event("t", timestamp=told)], received_at=NOW))])

    resend = event("t", timestamp=NOW, timestamp_defaulted=True)
    result = applier.apply([record(envelope_bytes(org, [resend], received_at=NOW))])

    assert (result.counted, result.duplicates, result.conflicts) == (0, 1, 0)
    assert totals(engine, org) == (Decimal(1), 1)


@pytest.mark.parametrize(
    "change",
    [
        {"quantity": 3},
        {"metric": "storage_gb"},
        {"timestamp": NOW - timedelta(minutes=30)},
        {"project_id": "project"},
    ],
    ids=["quantity", "metric", "timestamp", "project"],
)
def test_resend_with_other_explicit_content_is_a_conflicting_duplicate(
    engine: Engine, applier: BatchApplier, change: dict[str, object]
) -> None:
    tenant = make_tenant(engine, projects=1)
    org = tenant.organization_id
    if change.get("project_id") == "project":
        change = {"project_id": tenant.project_ids[0]}
    applier.apply([record(envelope_bytes(org, [event("c", timestamp=NOW)], received_at=NOW))])

    resend = event(**{"event_id": "c", "timestamp": NOW, **change})  # type: ignore[arg-type]
    result = applier.apply([record(envelope_bytes(org, [resend], received_at=NOW))])

    assert (result.counted, result.duplicates, result.conflicts) == (0, 0, 1)
    assert [letter.code for letter in result.dead_letters] == ["conflicting_duplicate"]
    assert totals(engine, org) == (Decimal(1), 1)


def test_untimed_resend_with_another_quantity_is_a_conflict_that_keeps_its_flag(
    engine: Engine, applier: BatchApplier
) -> None:
    tenant = make_tenant(engine)
    org = tenant.organization_id
    first = event("q", timestamp=NOW, timestamp_defaulted=True)
    applier.apply([record(envelope_bytes(org, [first], received_at=NOW))])

    later = NOW + timedelta(seconds=2)
    resend = event("q", quantity=4, timestamp=later, timestamp_defaulted=True)
    result = applier.apply([record(envelope_bytes(org, [resend], received_at=later))])

    assert result.conflicts == 1
    (letter,) = result.dead_letters
    (carried,) = decode_envelope(letter.payload).events
    assert carried.timestamp_defaulted is True
    assert totals(engine, org) == (Decimal(1), 1)
