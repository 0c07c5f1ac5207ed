"""Billing at any second, against real PostgreSQL and the aggregator's own batch code: a plan
change splits a period (each side on its own plan, flat fees prorated by time), a cancellation
cuts it, a new subscription in the same window bills only what follows it, and no change after a
period ended re-prices that period. Expected amounts are worked out here from the raw events."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.aggregator.service import BatchApplier
from services.billing.invoices import Invoice
from services.billing.service import RunResult, run_billing
from shared.db import unit_of_work
from shared.errors import InvalidInput
from shared.models import BillingInterval, Plan
from shared.settings import Settings
from shared.subscriptions import cancel_now, change_plan, create_subscription
from tests import factories
from tests.aggregator_support import envelope_bytes, event, make_tenant, record

# A period in the past, anchored off every window boundary.
START = datetime(2026, 9, 3, 13, 27, 45, tzinfo=UTC)
END = datetime(2026, 10, 3, 13, 27, 45, tzinfo=UTC)
PLAN_A = {"metered": {"api_calls": {"model": "per_unit", "unit_amount": "1", "included": 10}}}
PLAN_B = {"metered": {"api_calls": {"model": "per_unit", "unit_amount": "3"}}}


def plans(engine: Engine) -> tuple[uuid.UUID, uuid.UUID]:
    with unit_of_work(engine) as session:
        a = factories.make_plan(session, price_monthly=3000, features=PLAN_A)
        b = factories.make_plan(session, price_monthly=9001, features=PLAN_B)
        return a.id, b.id


def subscribe(engine: Engine, organization_id: uuid.UUID, plan_id: uuid.UUID, at: datetime) -> Any:
    with unit_of_work(engine) as session:
        return create_subscription(
            session,
            organization_id=organization_id,
            plan_id=plan_id,
            interval=BillingInterval.MONTH,
            now=at,
        ).id


def apply_events(
    engine: Engine,
    settings: Settings,
    organization_id: uuid.UUID,
    stamps: list[tuple[datetime, int]],
) -> None:
    """Count events through the aggregator's batch (ledger, windows, usage cuts)."""
    events = [
        event(f"e-{uuid.uuid4().hex[:12]}", quantity=quantity, timestamp=at)
        for at, quantity in stamps
    ]
    received = max(at for at, _ in stamps) + timedelta(minutes=1)
    BatchApplier(engine, settings).apply(
        [record(envelope_bytes(organization_id, events, received_at=received))]
    )


def bill(
    engine: Engine, settings: Settings, organization_id: uuid.UUID, as_of: datetime
) -> RunResult:
    return run_billing(
        engine,
        as_of=as_of,
        now=datetime.now(UTC),
        lateness_horizon=timedelta(days=400),
        organization_id=organization_id,
    )


def of(result: RunResult, subscription_id: uuid.UUID, start: datetime) -> Invoice:
    [found] = [
        i for i in result.billed if i.subscription_id == subscription_id and i.period_start == start
    ]
    return found


def usage(invoice: Invoice) -> list[tuple[datetime | None, Decimal, int]]:
    return sorted(
        (line.segment_start, line.quantity, line.amount)
        for line in invoice.lines
        if line.kind == "usage"
    )


def half_up(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def share(fee: int, part: timedelta, whole: timedelta) -> int:
    return half_up(Decimal(fee) * Decimal(part // timedelta(microseconds=1))
                   / Decimal(whole // timedelta(microseconds=1)))  # fmt: skip


def test_a_plan_change_mid_period_prices_each_side_on_its_plan_and_prorates_the_fees(
    engine: Engine, settings: Settings
) -> None:
    a, b = plans(engine)
    tenant = make_tenant(engine)
    org = tenant.organization_id
    subscription = subscribe(engine, org, a, START)
    changed = START + timedelta(days=10, hours=5, minutes=13, seconds=9)
    before = [(START - timedelta(seconds=1), 1000)]  # before the subscription: billed nowhere
    on_a = [(START, 7), (changed - timedelta(microseconds=1), 8), (START + timedelta(hours=1), 5)]
    on_b = [(changed, 20), (changed + timedelta(seconds=1), 22), (END - timedelta(seconds=1), 4)]
    after = [(END, 500)]  # the next period
    apply_events(engine, settings, org, before + on_a + on_b + after)
    with unit_of_work(engine) as session:
        change_plan(session, subscription, plan_id=b, now=changed)

    result = bill(engine, settings, org, END + timedelta(minutes=5))

    invoice = of(result, subscription, START)
    whole, remaining = END - START, END - changed
    flat = 3000 - share(3000, remaining, whole) + share(9001, remaining, whole)
    # Plan A: 20 calls, 10 included, 10 x 1; plan B: 46 calls x 3, from zero.
    assert invoice.status == "final"
    assert usage(invoice) == [(START, Decimal(20), 10), (changed, Decimal(46), 138)]
    assert [line.amount for line in invoice.lines if line.kind == "flat"] == [
        3000,
        -share(3000, remaining, whole),
        share(9001, remaining, whole),
    ]
    assert (invoice.flat_amount, invoice.total) == (flat, flat + 10 + 138)
    # The next period is on plan B alone, with the event exactly at its start.
    following = of(result, subscription, END)
    assert usage(following) == [(END, Decimal(500), 1500)]
    assert [line.amount for line in following.lines if line.kind == "flat"] == [9001]


def test_no_change_after_a_period_ended_re_prices_it(engine: Engine, settings: Settings) -> None:
    a, b = plans(engine)
    org = make_tenant(engine).organization_id
    subscription = subscribe(engine, org, a, START)
    apply_events(engine, settings, org, [(START + timedelta(days=3), 30)])
    draft = of(bill(engine, settings, org, END - timedelta(hours=1)), subscription, START)
    # After the end, before any run: the plan changes, and plan A's price is edited.
    with unit_of_work(engine) as session:
        change_plan(session, subscription, plan_id=b, now=END + timedelta(minutes=1))
        session.execute(sa.update(Plan).where(Plan.id == a).values(price_monthly=100))

    final = of(bill(engine, settings, org, END + timedelta(hours=2)), subscription, START)

    assert draft.status == "draft" and final.status == "final"
    assert (final.total, usage(final)) == (3000 + 20, [(START, Decimal(30), 20)])
    assert final.total == draft.total


def test_a_plan_change_cannot_be_dated_into_an_ended_period(
    engine: Engine, settings: Settings
) -> None:
    a, b = plans(engine)
    org = make_tenant(engine).organization_id
    subscription = subscribe(engine, org, a, START)
    bill(engine, settings, org, END + timedelta(days=1))  # the period moved on

    with pytest.raises(InvalidInput, match="never re-priced"), unit_of_work(engine) as session:
        change_plan(session, subscription, plan_id=b, now=END - timedelta(seconds=1))


def test_cancel_and_resubscribe_in_one_window_bills_each_unit_once(
    engine: Engine, settings: Settings
) -> None:
    a, b = plans(engine)
    org = make_tenant(engine).organization_id
    first = subscribe(engine, org, a, START)
    canceled = START + timedelta(days=12, minutes=41, seconds=3)
    resumed = canceled + timedelta(seconds=17)  # the same hour: both cut one window
    apply_events(
        engine,
        settings,
        org,
        [
            (canceled - timedelta(seconds=1), 11),
            (canceled, 13),  # in the gap: no subscription is live, billed nowhere
            (resumed - timedelta(microseconds=1), 17),
            (resumed, 19),
            (resumed + timedelta(minutes=5), 23),
        ],
    )
    with unit_of_work(engine) as session:
        cancel_now(session, first, now=canceled)
    second = subscribe(engine, org, b, resumed)

    result = bill(engine, settings, org, resumed + timedelta(days=1))
    again = bill(engine, settings, org, resumed + timedelta(days=1))

    old, new = of(result, first, START), of(result, second, resumed)
    assert (old.status, old.period_end) == ("final", canceled)
    assert usage(old) == [(START, Decimal(11), 1)]
    assert [line.amount for line in old.lines if line.kind == "flat"] == [
        3000,
        -share(3000, END - canceled, END - START),
    ]
    assert usage(new) == [(resumed, Decimal(42), 126)]
    assert again.invoices == [] and again.skipped == 2


def test_a_rerun_reads_nothing_until_usage_or_terms_change(
    engine: Engine, settings: Settings
) -> None:
    a, _ = plans(engine)
    org = make_tenant(engine).organization_id
    subscription = subscribe(engine, org, a, START)
    as_of = START + timedelta(days=2)
    apply_events(engine, settings, org, [(START + timedelta(hours=2), 15)])
    first = bill(engine, settings, org, as_of)

    second = bill(engine, settings, org, as_of)
    apply_events(engine, settings, org, [(START + timedelta(hours=3), 4)])
    third = bill(engine, settings, org, as_of)

    assert (len(first.invoices), first.skipped) == (1, 0)
    assert (second.invoices, second.skipped) == ([], 1)
    assert [invoice.total for invoice in second.billed] == [first.invoices[0].total]
    assert third.skipped == 0
    assert usage(of(third, subscription, START)) == [(START, Decimal(19), 9)]
