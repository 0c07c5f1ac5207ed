"""Billing while a replay rebuilds: between two slices a range is part rebuilt and part as it was,
so a billing run then is refused (it would price the mix), and one after the replay prices the
rebuilt range. A replay never waits on a refused run, and a dry-run replay refuses nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.aggregator.replay import ReplayRequest, replay
from services.aggregator.topic_reader import InMemoryTopicReader
from services.billing.invoices import ordered_lines
from services.billing.service import RunResult, run_billing
from shared.db import unit_of_work
from shared.errors import Conflict
from shared.models import Organization
from shared.settings import Settings
from shared.usage_locks import REBUILD_LOCK, no_rebuild_running
from tests import factories
from tests.aggregator_support import envelope_bytes, event

NOW = datetime.now(UTC)
BASE = NOW.replace(minute=0, second=0, microsecond=0) - timedelta(hours=30)
# Off the window grid, so billing registers a cut inside a window of the replayed range.
PERIOD_END = BASE + timedelta(hours=24, minutes=17)
EVENTS = 600
STEP = timedelta(hours=25) / EVENTS


def subscribed_organization(engine: Engine) -> Organization:
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session)
        plan = factories.make_plan(
            session,
            features={"metered": {"api_calls": {"model": "per_unit", "unit_amount": "1"}}},
        )
        factories.make_subscription(
            session,
            organization,
            plan,
            period_start=BASE - timedelta(days=2),
            period_end=PERIOD_END,
        )
        return organization


def topic_of(settings: Settings, organization: Organization) -> InMemoryTopicReader:
    reader = InMemoryTopicReader(settings.events_topic, [0, 1])
    for i in range(0, EVENTS, 10):
        sent = [event(f"e{j}", timestamp=BASE + STEP * j) for j in range(i, i + 10)]
        received = BASE + STEP * (i + 10)
        reader.append(
            i // 10 % 2,
            envelope_bytes(organization.id, sent, received_at=received),
            timestamp_ms=int(received.timestamp() * 1000),
        )
    return reader


def bill(engine: Engine, settings: Settings, organization: Organization) -> RunResult:
    return run_billing(
        engine,
        as_of=NOW,
        now=NOW,
        lateness_horizon=settings.lateness_horizon,
        organization_id=organization.id,
        dry_run=True,
        list_invoices=True,
    )


def api_calls_billed(result: RunResult) -> Decimal:
    """The api_calls billed for the period that ends at PERIOD_END."""
    return sum(
        (
            line.quantity
            for invoice in result.billed
            for line in ordered_lines(invoice)
            if line.kind == "usage"
            and line.metric == "api_calls"
            and line.segment_end == PERIOD_END
        ),
        Decimal(0),
    )


def many_slices(settings: Settings) -> Settings:
    return settings.model_copy(update={"replay_chunk_records": 7, "replay_slice_events": 60})


def test_billing_between_two_slices_is_refused_and_after_the_replay_prices_the_rebuilt_range(
    engine: Engine, settings: Settings
) -> None:
    organization = subscribed_organization(engine)
    reader = topic_of(settings, organization)
    refused: list[str] = []
    slices: list[int] = []

    def bill_between_slices(done: int, total: int) -> None:
        slices.append(total)
        if done < total:
            with pytest.raises(Conflict) as caught:
                bill(engine, settings, organization)
            refused.append(str(caught.value))

    replay(
        engine,
        many_slices(settings),
        reader,
        ReplayRequest(BASE, BASE + timedelta(hours=25), organization.id),
        now=NOW,
        on_slice=bill_between_slices,
    )

    assert slices and slices[0] >= 5
    assert len(refused) == slices[0] - 1
    assert "a replay is rebuilding usage" in refused[0]
    # Events before the period's end, 17 minutes into a window: every one of them, once.
    before_end = sum(1 for j in range(EVENTS) if BASE + STEP * j < PERIOD_END)
    assert api_calls_billed(bill(engine, settings, organization)) == before_end


def test_a_dry_run_replay_refuses_no_billing_and_billing_holds_off_no_replay(
    engine: Engine, settings: Settings
) -> None:
    organization = subscribed_organization(engine)
    reader = topic_of(settings, organization)
    billed: list[Decimal] = []
    request = ReplayRequest(BASE, BASE + timedelta(hours=25), organization.id, dry_run=True)

    replay(
        engine,
        many_slices(settings),
        reader,
        request,
        now=NOW,
        on_slice=lambda done, total: billed.append(
            api_calls_billed(bill(engine, settings, organization))
        ),
    )

    assert len(billed) >= 5
    assert set(billed) == {Decimal(0)}  # nothing was counted, and the dry run wrote nothing
    # After a billing run, the rebuild lock is free: a real replay takes it and finishes.
    report = replay(
        engine,
        many_slices(settings),
        reader,
        ReplayRequest(BASE, BASE + timedelta(hours=25), organization.id),
        now=NOW,
    )
    assert report.events_counted == EVENTS
    with engine.connect() as connection:
        held = connection.execute(
            sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                " AND classid = :ns AND objid = :key AND objsubid = 2"
            ),
            {"ns": REBUILD_LOCK[0], "key": REBUILD_LOCK[1]},
        ).scalar_one()
    assert held == 0


def test_two_billing_runs_at_once_do_not_refuse_each_other(
    engine: Engine, settings: Settings
) -> None:
    organization = subscribed_organization(engine)
    replay(
        engine,
        settings,
        topic_of(settings, organization),
        ReplayRequest(BASE, BASE + timedelta(hours=25), organization.id),
        now=NOW,
    )
    with no_rebuild_running(engine):  # another billing run is reading its totals
        during = api_calls_billed(bill(engine, settings, organization))
    assert during == sum(1 for j in range(EVENTS) if BASE + STEP * j < PERIOD_END)
