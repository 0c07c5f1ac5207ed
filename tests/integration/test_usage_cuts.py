"""Usage cuts against real PostgreSQL: a cut's part is the same whether it was registered before
the events were applied (the batch keeps it) or after (registration reads the ledger)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.aggregator.service import BatchApplier
from shared.settings import Settings
from shared.usage_cuts import Cut, ledger_cut_parts, register_cuts, registered_cut_parts
from tests.aggregator_support import envelope_bytes, event, make_tenant, record

HOUR = (datetime.now(UTC) - timedelta(days=2)).replace(minute=0, second=0, microsecond=0)
CUT = HOUR + timedelta(minutes=27, seconds=45)


def apply(applier: BatchApplier, org: object, events: list) -> None:
    applier.apply([record(envelope_bytes(org, events, received_at=HOUR + timedelta(hours=2)))])  # type: ignore[arg-type]


def events_around_the_cut(prefix: str) -> list:
    return [
        event(f"{prefix}-before", quantity=1, timestamp=CUT - timedelta(microseconds=1)),
        event(f"{prefix}-at", quantity=2, timestamp=CUT),
        event(f"{prefix}-late-in-window", quantity=4, timestamp=HOUR + timedelta(minutes=59)),
        event(f"{prefix}-next-window", quantity=8, timestamp=HOUR + timedelta(hours=1)),
        event(f"{prefix}-other-metric", metric="exports", quantity=16, timestamp=CUT),
    ]


def parts(engine: Engine, cut: Cut) -> dict[str, tuple[Decimal, int]]:
    with engine.connect() as connection:
        registered, found = registered_cut_parts(connection, [cut])
    assert cut in registered
    return {p.metric: (p.quantity, p.event_count) for p in found.get(cut, ())}


def test_a_cut_registered_before_the_events_is_kept_by_the_batches(
    engine: Engine, settings: Settings
) -> None:
    tenant = make_tenant(engine)
    cut = Cut(tenant.organization_id, CUT)
    with engine.begin() as connection:
        assert register_cuts(connection, [cut]) == [cut]

    apply(BatchApplier(engine, settings), tenant.organization_id, events_around_the_cut("e"))

    assert parts(engine, cut) == {"api_calls": (Decimal(6), 2), "exports": (Decimal(16), 1)}


def test_a_cut_registered_after_the_events_reads_the_same_part_from_the_ledger(
    engine: Engine, settings: Settings
) -> None:
    tenant = make_tenant(engine)
    cut = Cut(tenant.organization_id, CUT)
    apply(BatchApplier(engine, settings), tenant.organization_id, events_around_the_cut("e"))

    with engine.begin() as connection:
        assert register_cuts(connection, [cut]) == [cut]
        again = register_cuts(connection, [cut])

    assert again == []
    assert parts(engine, cut) == {"api_calls": (Decimal(6), 2), "exports": (Decimal(16), 1)}


def test_a_cut_at_a_window_start_has_no_part(engine: Engine, settings: Settings) -> None:
    tenant = make_tenant(engine)
    apply(BatchApplier(engine, settings), tenant.organization_id, events_around_the_cut("e"))

    with engine.connect() as connection:
        found = ledger_cut_parts(connection, [Cut(tenant.organization_id, HOUR)])

    assert found == {}


def test_a_midnight_is_never_registered_as_it_splits_no_window(engine: Engine) -> None:
    tenant = make_tenant(engine)
    midnight = HOUR.replace(hour=0)

    with engine.begin() as connection:
        assert register_cuts(connection, [Cut(tenant.organization_id, midnight)]) == []
        count = connection.execute(
            sa.text("SELECT count(*) FROM usage_cuts WHERE organization_id = :org"),
            {"org": tenant.organization_id},
        ).scalar_one()
    assert count == 0


def test_usage_versions_change_with_every_write_of_an_organization_s_usage(
    engine: Engine, settings: Settings
) -> None:
    tenant = make_tenant(engine)

    def version() -> int | None:
        with engine.connect() as connection:
            return connection.execute(
                sa.text("SELECT version FROM usage_versions WHERE organization_id = :org"),
                {"org": tenant.organization_id},
            ).scalar_one_or_none()

    assert version() is None
    apply(BatchApplier(engine, settings), tenant.organization_id, events_around_the_cut("a"))
    first = version()
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE usage_records SET quantity = quantity WHERE organization_id = :org"),
            {"org": tenant.organization_id},
        )
    second = version()

    assert first is not None and second is not None and second != first
