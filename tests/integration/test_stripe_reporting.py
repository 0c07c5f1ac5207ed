"""Stripe from a billing run: request shapes accepted by stripe-mock, whole-number deltas, reruns
and crashes that report each identifier once, pacing on 429, and reconciliation's fixes.

Stateful flows use the fake of test_stripe_fake_server (it forwards every request to stripe-mock
first, so each call is still checked against Stripe's API document)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.billing.gateway import MeterEvent, StripeGateway
from services.billing.service import run_billing
from shared.db import unit_of_work
from shared.models import StripeMeterReport, Subscription, UsageRecord
from shared.settings import Settings
from tests import factories
from tests.integration.test_stripe_fake_server import FakeStripe, fake_stripe_fixture  # noqa: F401

FEATURES = {
    "metered": {
        "api_calls": {"model": "per_unit", "unit_amount": "0.5", "stripe_meter": "api_calls"},
        "exports": {"model": "per_unit", "unit_amount": "2", "stripe_meter": "exports"},
    }
}
NOW = datetime.now(UTC).replace(microsecond=0)
PERIOD_START = (NOW - timedelta(days=10)).replace(minute=0, second=0)


def seed(engine: Engine) -> dict[str, Any]:
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session)
        plan = factories.make_plan(session, price_monthly=1000, features=FEATURES)
        subscription = factories.make_subscription(
            session,
            organization,
            plan,
            period_start=PERIOD_START,
            period_end=PERIOD_START + timedelta(days=30),
        )
        return {"organization_id": organization.id, "subscription_id": subscription.id}


def add_usage(
    engine: Engine, org: dict[str, Any], metric: str, hours_in: int, quantity: str
) -> None:
    with unit_of_work(engine) as session:
        session.add(
            UsageRecord(
                organization_id=org["organization_id"],
                project_id=None,
                api_key_id=None,
                metric=metric,
                window_start=PERIOD_START + timedelta(hours=hours_in),
                window_seconds=3600,
                quantity=Decimal(quantity),
                event_count=1,
            )
        )


def bill(engine: Engine, settings: Settings, org: dict[str, Any], gateway: Any) -> Any:
    return run_billing(
        engine,
        as_of=NOW,
        now=NOW,
        lateness_horizon=settings.lateness_horizon,
        organization_id=org["organization_id"],
        gateway=gateway,
    )


def gateway_for(fake: FakeStripe) -> StripeGateway:
    return StripeGateway("sk_test_123", fake.base, rate_per_second=200, backoff_seconds=0.01)


def ledger(engine: Engine, org: dict[str, Any]) -> list[Any]:
    with engine.connect() as connection:
        return connection.execute(
            sa.select(
                StripeMeterReport.metric,
                StripeMeterReport.value,
                StripeMeterReport.identifier,
                StripeMeterReport.sent_at.is_not(None),
            )
            .where(StripeMeterReport.subscription_id == org["subscription_id"])
            .order_by(StripeMeterReport.metric, StripeMeterReport.sequence)
        ).all()


def test_every_stripe_call_of_the_worker_is_accepted_by_stripe_mock(settings: Settings) -> None:
    gateway = StripeGateway("sk_test_123", settings.stripe_api_base)
    customer = gateway.create_customer("org-1", "Acme")
    price = gateway.ensure_price("plan-1", "Pro", "month", 4900, "usd")
    start = NOW - timedelta(days=3)
    created = gateway.create_subscription(
        "sub-1", customer, price, start, start + timedelta(days=30)
    )
    gateway.report_meter_event(MeterEvent("api_calls", customer, 5, "ml_shape_test", NOW))
    gateway.report_meter_event(MeterEvent("api_calls", customer, -2, "ml_shape_neg", NOW))
    found = gateway.get_subscription(created)
    total = gateway.meter_total("test-meter-event-name", customer, start, NOW)
    assert customer and price and created
    assert found.status and isinstance(total, int)


def test_a_run_reports_whole_deltas_and_a_rerun_reports_nothing_new(
    engine: Engine, settings: Settings, fake_stripe: FakeStripe
) -> None:
    org = seed(engine)
    add_usage(engine, org, "api_calls", 1, "10.6")
    first = bill(engine, settings, org, gateway_for(fake_stripe))
    assert [(r["metric"], r["value"]) for r in first.reported] == [("api_calls", 10)]

    add_usage(engine, org, "api_calls", 2, "0.7")  # 11.3: the carried 0.6 makes one more unit
    second = bill(engine, settings, org, gateway_for(fake_stripe))
    third = bill(engine, settings, org, gateway_for(fake_stripe))

    assert [(r["metric"], r["value"]) for r in second.reported] == [("api_calls", 1)]
    assert third.reported == [] and third.invoices == [] and third.mismatches == []
    with engine.connect() as connection:
        customer = connection.execute(
            sa.select(Subscription.stripe_customer_id).where(
                Subscription.id == org["subscription_id"]
            )
        ).scalar_one()
    assert fake_stripe.meter_total("api_calls", customer, 0, 2**31) == 11


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way up handles it."""


class CrashAfter:
    """The real gateway, but the process 'dies' right after Stripe accepted the n-th event."""

    def __init__(self, gateway: StripeGateway, accepted: int) -> None:
        self.gateway = gateway
        self.left = accepted

    def __getattr__(self, name: str) -> Any:
        return getattr(self.gateway, name)

    def report_meter_event(self, event: MeterEvent) -> None:
        self.gateway.report_meter_event(event)
        self.left -= 1
        if self.left == 0:
            raise Crash


def test_a_run_killed_after_stripe_accepted_reports_each_identifier_once_on_rerun(
    engine: Engine, settings: Settings, fake_stripe: FakeStripe
) -> None:
    org = seed(engine)
    add_usage(engine, org, "api_calls", 1, "40")
    add_usage(engine, org, "exports", 1, "3")
    with pytest.raises(Crash):
        bill(engine, settings, org, CrashAfter(gateway_for(fake_stripe), accepted=1))
    assert [sent for *_, sent in ledger(engine, org)] == [False, False]

    bill(engine, settings, org, gateway_for(fake_stripe))
    bill(engine, settings, org, gateway_for(fake_stripe))

    rows = ledger(engine, org)
    assert [(metric, value, sent) for metric, value, _, sent in rows] == [
        ("api_calls", 40, True),
        ("exports", 3, True),
    ]
    identifiers = {identifier for _, _, identifier, _ in rows}
    assert set(fake_stripe.meter_events) == identifiers
    # The event accepted before the crash was sent again with the same identifier (3 requests for
    # 2 events); Stripe kept one, so the reported totals are exact.
    assert fake_stripe.meter_event_requests == 3
    customer = next(iter(fake_stripe.customers))
    assert fake_stripe.meter_total("api_calls", customer, 0, 2**31) == 40
    assert fake_stripe.meter_total("exports", customer, 0, 2**31) == 3


def test_meter_events_are_paced_and_retried_on_429(
    engine: Engine, settings: Settings, fake_stripe: FakeStripe
) -> None:
    org = seed(engine)
    add_usage(engine, org, "exports", 1, "5")
    fake_stripe.rate_limit_next = 2

    result = bill(engine, settings, org, gateway_for(fake_stripe))

    assert [(r["metric"], r["value"]) for r in result.reported] == [("exports", 5)]
    assert fake_stripe.rate_limit_next == 0
    assert len(fake_stripe.meter_events) == 1


def test_reconciliation_detects_each_injected_mismatch_and_fixes_the_safe_ones(
    engine: Engine, settings: Settings, fake_stripe: FakeStripe
) -> None:
    org = seed(engine)
    add_usage(engine, org, "api_calls", 1, "25")
    clean = bill(engine, settings, org, gateway_for(fake_stripe))
    assert clean.mismatches == []
    [(identifier, event)] = list(fake_stripe.meter_events.items())
    [subscription] = fake_stripe.subscriptions.values()
    # Injected: Stripe lost the event, the subscription went past_due, its price changed.
    del fake_stripe.meter_events[identifier]
    subscription["status"] = "past_due"
    subscription["items"]["data"][0]["price"] = dict(
        subscription["items"]["data"][0]["price"], unit_amount=1500
    )

    result = bill(engine, settings, org, gateway_for(fake_stripe))

    found = {m["kind"]: m for m in result.mismatches}
    assert set(found) == {"usage_not_reported", "status_differs", "price_differs"}
    assert (found["usage_not_reported"]["ours"], found["usage_not_reported"]["theirs"]) == (
        "25",
        "0",
    )
    assert found["usage_not_reported"]["resolved"] is True
    assert found["status_differs"]["resolved"] is True
    assert (found["price_differs"]["amount"], found["price_differs"]["resolved"]) == ("500", False)
    customer = event["payload"]["stripe_customer_id"]
    assert fake_stripe.meter_total("api_calls", customer, 0, 2**31) == 25
    with engine.connect() as connection:
        status = connection.execute(
            sa.select(Subscription.status).where(Subscription.id == org["subscription_id"])
        ).scalar_one()
    assert status == "past_due"
    after = bill(engine, settings, org, gateway_for(fake_stripe))
    assert [m["kind"] for m in after.mismatches] == ["price_differs"]
