"""Stripe from a billing run: request shapes accepted by stripe-mock, whole-number deltas, reruns
and crashes that report each identifier once, pacing on 429, and reconciliation's fixes.

Stateful flows use the fake of tests/stripe_fake.py (it forwards every request to stripe-mock
first, so each call is still checked against Stripe's API document)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
import stripe
from sqlalchemy.engine import Engine

from services.billing.gateway import InvoiceItem, MeterEvent, StripeGateway
from services.billing.service import run_billing
from shared.db import unit_of_work
from shared.models import Organization, StripeMeterReport, Subscription, UsageRecord
from shared.settings import Settings
from tests import factories
from tests.stripe_fake import FakeStripe

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


def customer_of(engine: Engine, org: dict[str, Any]) -> str:
    with engine.connect() as connection:
        return connection.execute(
            sa.select(Organization.stripe_customer_id).where(
                Organization.id == org["organization_id"]
            )
        ).scalar_one()


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
    start = (NOW - timedelta(days=3)).replace(second=0)
    gateway.report_meter_event(MeterEvent("api_calls", customer, 5, "ml_shape_test", NOW))
    gateway.report_meter_event(MeterEvent("api_calls", customer, -2, "ml_shape_neg", NOW))
    found = gateway.get_subscription("sub_123")
    total = gateway.meter_total("test-meter-event-name", customer, start, NOW.replace(second=0))
    invoice = gateway.create_invoice("inv-1", customer, "usd", "Meterline invoice", {"a": "b"})
    gateway.add_invoice_item(
        invoice.id, customer, "inv-1", InvoiceItem("line-1", -250, "usd", "credit", start, NOW)
    )
    present = gateway.invoice_line_ids(invoice.id)
    finalized = gateway.finalize_invoice(invoice.id, "inv-1")
    again = gateway.get_invoice(invoice.id)
    searched = gateway.find_invoice("inv-1")
    assert customer and found.status and isinstance(total, int)
    assert invoice.id and finalized.id and again.id and isinstance(present, set)
    assert searched is None or searched.id


def test_a_run_reports_whole_deltas_and_a_rerun_reports_nothing_new(
    engine: Engine, settings: Settings, fake_stripe: FakeStripe
) -> None:
    org = seed(engine)
    add_usage(engine, org, "api_calls", 1, "10.6")
    first = bill(engine, settings, org, gateway_for(fake_stripe))
    assert [(r.metric, r.value) for r in first.reported] == [("api_calls", 10)]

    add_usage(engine, org, "api_calls", 2, "0.7")  # 11.3: the carried 0.6 makes one more unit
    second = bill(engine, settings, org, gateway_for(fake_stripe))
    third = bill(engine, settings, org, gateway_for(fake_stripe))

    assert [(r.metric, r.value) for r in second.reported] == [("api_calls", 1)]
    assert third.reported == [] and third.invoices == [] and third.mismatches == []
    customer = customer_of(engine, org)
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

    assert [(r.metric, r.value) for r in result.reported] == [("exports", 5)]
    assert fake_stripe.rate_limit_next == 0
    assert len(fake_stripe.meter_events) == 1


def test_reconciliation_detects_each_injected_mismatch_and_fixes_the_safe_ones(
    engine: Engine, settings: Settings, fake_stripe: FakeStripe
) -> None:
    org = seed(engine)
    add_usage(engine, org, "api_calls", 1, "25")
    clean = bill(engine, settings, org, gateway_for(fake_stripe))
    assert clean.mismatches == []
    customer = customer_of(engine, org)
    # A Stripe subscription an earlier release made for it, now past_due at another price.
    client = stripe.StripeClient("sk_test_123", base_addresses={"api": fake_stripe.base})
    price = client.v1.prices.create(
        {"currency": "usd", "unit_amount": 1500, "recurring": {"interval": "month"}, "product": "p"}
    )
    linked = client.v1.subscriptions.create(
        {
            "customer": customer,
            "items": [{"price": price.id}],
            "backdate_start_date": int(PERIOD_START.timestamp()),
            "billing_cycle_anchor": int((PERIOD_START + timedelta(days=30)).timestamp()),
        }
    )
    fake_stripe.subscriptions[linked.id]["status"] = "past_due"
    with unit_of_work(engine) as session:
        session.execute(
            sa.update(Subscription)
            .where(Subscription.id == org["subscription_id"])
            .values(stripe_subscription_id=linked.id)
        )
    # Injected: Stripe lost the meter event.
    fake_stripe.meter_event_log.clear()

    result = bill(engine, settings, org, gateway_for(fake_stripe))

    found = {m.kind: m for m in result.mismatches}
    assert set(found) == {"usage_not_reported", "status_differs", "price_differs"}
    assert (found["usage_not_reported"].ours, found["usage_not_reported"].theirs) == ("25", "0")
    assert found["usage_not_reported"].resolved is True
    assert found["status_differs"].resolved is True
    assert (found["price_differs"].amount, found["price_differs"].resolved) == (500, False)
    assert fake_stripe.meter_total("api_calls", customer, 0, 2**31) == 25
    with engine.connect() as connection:
        status = connection.execute(
            sa.select(Subscription.status).where(Subscription.id == org["subscription_id"])
        ).scalar_one()
    assert status == "past_due"
    after = bill(engine, settings, org, gateway_for(fake_stripe))
    assert [m.kind for m in after.mismatches] == ["price_differs"]


def test_a_report_stripe_refuses_for_good_is_parked_and_the_others_go_on(
    engine: Engine, settings: Settings, fake_stripe: FakeStripe
) -> None:
    refused, fine = seed(engine), seed(engine)
    for org in (refused, fine):
        add_usage(engine, org, "api_calls", 1, "7")
    gateway = gateway_for(fake_stripe)
    # Its customer exists, but Stripe refuses every meter event of it.
    with pytest.raises(Crash):
        bill(engine, settings, refused, _NoReports(gateway))
    fake_stripe.refuse_customers.add(customer_of(engine, refused))

    first = bill_all(engine, settings, [refused, fine], gateway)
    second = bill_all(engine, settings, [refused, fine], gateway)

    assert [(m.kind, m.metric, m.resolved) for m in first.mismatches] == [
        ("report_refused", "api_calls", False)
    ]
    assert "No such customer" in first.mismatches[0].theirs
    assert [(r.subscription_id, r.value) for r in first.reported] == [(fine["subscription_id"], 7)]
    assert second.reported == [] and second.mismatches == []
    assert fake_stripe.meter_total("api_calls", customer_of(engine, fine), 0, 2**31) == 7
    rows = ledger(engine, refused)
    assert [(metric, value, sent) for metric, value, _, sent in rows] == [("api_calls", 7, False)]
    with engine.connect() as connection:
        parked = connection.execute(
            sa.select(StripeMeterReport.parked_at.is_not(None)).where(
                StripeMeterReport.subscription_id == refused["subscription_id"]
            )
        ).scalar_one()
    assert parked is True


class _NoReports:
    """The real gateway, but a 'crash' before any meter event leaves: links customers only."""

    def __init__(self, gateway: StripeGateway) -> None:
        self.gateway = gateway

    def __getattr__(self, name: str) -> Any:
        return getattr(self.gateway, name)

    def report_meter_event(self, event: MeterEvent) -> None:
        raise Crash


def bill_all(engine: Engine, settings: Settings, orgs: list[dict[str, Any]], gateway: Any) -> Any:
    result = None
    for org in orgs:
        one = bill(engine, settings, org, gateway)
        if result is None:
            result = one
        else:
            result.reported += one.reported
            result.mismatches += one.mismatches
    return result


def _age_attempts(engine: Engine, org: dict[str, Any], hours: int) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.update(StripeMeterReport)
            .where(StripeMeterReport.subscription_id == org["subscription_id"])
            .values(first_attempt_at=StripeMeterReport.first_attempt_at - timedelta(hours=hours))
        )


def test_a_resend_older_than_the_identifier_window_is_not_sent_when_stripe_has_it(
    engine: Engine, settings: Settings, fake_stripe: FakeStripe
) -> None:
    org = seed(engine)
    add_usage(engine, org, "api_calls", 1, "40")
    # Stripe takes the event, the answer is lost, and the next run comes 25 hours later, when
    # Stripe no longer deduplicates the identifier.
    with pytest.raises(Crash):
        bill(engine, settings, org, CrashAfter(gateway_for(fake_stripe), accepted=1))
    _age_attempts(engine, org, 25)
    fake_stripe.forget_identifiers()

    result = bill(engine, settings, org, gateway_for(fake_stripe))

    assert fake_stripe.meter_total("api_calls", customer_of(engine, org), 0, 2**31) == 40
    assert fake_stripe.meter_event_requests == 1
    assert [(r.value, r.sent_at is not None) for r in result.reported] == [(40, True)]
    assert [sent for *_, sent in ledger(engine, org)] == [True]


def test_a_resend_older_than_the_identifier_window_is_sent_once_when_stripe_lacks_it(
    engine: Engine, settings: Settings, fake_stripe: FakeStripe
) -> None:
    org = seed(engine)
    add_usage(engine, org, "api_calls", 1, "40")
    # The attempt never reached Stripe (the connection dropped); 25 hours pass.
    with pytest.raises(Crash):
        bill(engine, settings, org, _NoReports(gateway_for(fake_stripe)))
    with engine.begin() as connection:
        connection.execute(
            sa.update(StripeMeterReport)
            .where(StripeMeterReport.subscription_id == org["subscription_id"])
            .values(attempts=1, first_attempt_at=sa.func.now() - timedelta(hours=25))
        )

    bill(engine, settings, org, gateway_for(fake_stripe))
    bill(engine, settings, org, gateway_for(fake_stripe))

    assert fake_stripe.meter_total("api_calls", customer_of(engine, org), 0, 2**31) == 40
    assert fake_stripe.meter_event_requests == 1
