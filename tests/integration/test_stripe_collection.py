"""Stripe collects what Meterline invoices: the Stripe invoice of each closed period holds our
lines and our total to the cent, crashes and expired idempotency keys add nothing twice, meter
events still reach Stripe without being charged, and reconciliation reports a Stripe invoice
whose total was changed. Against the stateful fake of tests/stripe_fake.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.billing.gateway import StripeGateway, StripeInvoice
from services.billing.service import RunResult, run_billing
from shared.db import unit_of_work
from shared.models import Invoice, Organization, UsageRecord
from shared.settings import Settings
from tests import factories
from tests.stripe_fake import FakeStripe

FEATURES = {
    "metered": {
        "api_calls": {
            "model": "graduated",
            "included": 100,
            "stripe_meter": "api_calls",
            "tiers": [
                {"up_to": 1000, "unit_amount": "0.5"},
                {"up_to": None, "unit_amount": "0.25", "flat_amount": 300},
            ],
        },
        "exports": {"model": "per_unit", "unit_amount": "2", "stripe_meter": "exports"},
    }
}
NOW = datetime.now(UTC).replace(microsecond=0)
START = (NOW - timedelta(days=20)).replace(minute=0, second=0)
END = START + timedelta(days=15)


def seed(engine: Engine) -> dict[str, Any]:
    """A subscription whose first period [START, END) closed five days ago, with usage in it."""
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session)
        plan = factories.make_plan(session, price_monthly=4900, features=FEATURES)
        subscription = factories.make_subscription(
            session, organization, plan, period_start=START, period_end=END
        )
        for hours, metric, quantity in ((1, "api_calls", "1500"), (30, "exports", "7")):
            session.add(
                UsageRecord(
                    organization_id=organization.id,
                    project_id=None,
                    api_key_id=None,
                    metric=metric,
                    window_start=START + timedelta(hours=hours),
                    window_seconds=3600,
                    quantity=Decimal(quantity),
                    event_count=1,
                )
            )
        return {"organization_id": organization.id, "subscription_id": subscription.id}


def bill(engine: Engine, settings: Settings, org: dict[str, Any], gateway: Any) -> RunResult:
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


def final_invoice(engine: Engine, org: dict[str, Any]) -> Any:
    with engine.connect() as connection:
        return connection.execute(
            sa.select(Invoice.id, Invoice.total, Invoice.stripe_invoice_id, Invoice.stripe_total)
            .where(Invoice.subscription_id == org["subscription_id"])
            .where(Invoice.status == "final")
        ).one()


class Crash(BaseException):
    """Stands for the process dying between a Stripe answer and the write that records it."""


class CrashAt:
    """The real gateway, but the process dies right after Stripe answered `operation`
    (after the n-th such call)."""

    def __init__(self, gateway: StripeGateway, operation: str, calls: int = 1) -> None:
        self.gateway = gateway
        self.operation = operation
        self.left = calls

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.gateway, name)
        if name != self.operation:
            return found

        def call(*args: Any) -> Any:
            answer = found(*args)
            self.left -= 1
            if self.left == 0:
                raise Crash
            return answer

        return call


def test_the_stripe_invoice_of_a_closed_period_holds_our_lines_and_total_to_the_cent(
    engine: Engine, settings: Settings, fake_stripe: FakeStripe
) -> None:
    org = seed(engine)

    result = bill(engine, settings, org, gateway_for(fake_stripe))

    ours = final_invoice(engine, org)
    # 1400 billable calls: 1000 x 0.5 = 500 (tier 1) + 400 x 0.25 = 100 + 300 flat (tier 2);
    # 7 exports x 2 = 14; the flat fee 4900.
    assert ours.total == 4900 + 500 + 100 + 300 + 14
    [theirs] = fake_stripe.invoices.values()
    assert (theirs["id"], theirs["status"]) == (ours.stripe_invoice_id, "open")
    assert fake_stripe.invoice_total(theirs["id"]) == ours.total == ours.stripe_total
    items = sorted(
        (item["description"].split(":")[0].split(" ")[0], item["amount"])
        for item in fake_stripe.invoice_items.values()
    )
    assert items == [("Plan", 4900), ("api_calls", 900), ("exports", 14)]
    assert [invoice.id for invoice in result.collected] == [ours.id]
    # The meters still see the usage, and charge nothing: no price is attached to them.
    with engine.connect() as connection:
        customer = connection.execute(
            sa.select(Organization.stripe_customer_id).where(
                Organization.id == org["organization_id"]
            )
        ).scalar_one()
    assert fake_stripe.meter_total("api_calls", customer, 0, 2**31) == 1500
    assert fake_stripe.meter_total("exports", customer, 0, 2**31) == 7


def test_a_crash_after_stripe_created_the_invoice_makes_no_second_one_a_day_later(
    engine: Engine, settings: Settings, fake_stripe: FakeStripe
) -> None:
    org = seed(engine)
    with pytest.raises(Crash):
        bill(engine, settings, org, CrashAt(gateway_for(fake_stripe), "create_invoice"))
    # A day later: Stripe has forgotten the idempotency key of the create.
    fake_stripe.expire_idempotency()

    bill(engine, settings, org, gateway_for(fake_stripe))
    bill(engine, settings, org, gateway_for(fake_stripe))

    ours = final_invoice(engine, org)
    assert len(fake_stripe.invoices) == 1
    assert len(fake_stripe.invoice_items) == 3
    assert fake_stripe.invoice_total(ours.stripe_invoice_id) == ours.total


def test_a_crash_between_invoice_items_adds_each_line_once(
    engine: Engine, settings: Settings, fake_stripe: FakeStripe
) -> None:
    org = seed(engine)
    with pytest.raises(Crash):
        bill(engine, settings, org, CrashAt(gateway_for(fake_stripe), "add_invoice_item", 2))
    fake_stripe.expire_idempotency()

    bill(engine, settings, org, gateway_for(fake_stripe))

    ours = final_invoice(engine, org)
    assert len(fake_stripe.invoice_items) == 3
    assert fake_stripe.invoice_total(ours.stripe_invoice_id) == ours.total
    assert fake_stripe.invoices[ours.stripe_invoice_id]["status"] == "open"


def test_reconciliation_reports_a_stripe_invoice_whose_total_differs(
    engine: Engine, settings: Settings, fake_stripe: FakeStripe
) -> None:
    org = seed(engine)
    assert bill(engine, settings, org, gateway_for(fake_stripe)).mismatches == []
    ours = final_invoice(engine, org)
    # Someone gives a discount by hand in Stripe's dashboard.
    fake_stripe.invoices[ours.stripe_invoice_id]["edited_by_hand"] = -500

    result = bill(engine, settings, org, gateway_for(fake_stripe))

    [mismatch] = result.mismatches
    assert (mismatch.kind, mismatch.ours, mismatch.resolved) == (
        "invoice_total_differs",
        str(ours.total),
        False,
    )
    assert mismatch.theirs.startswith(str(ours.total - 500))
    assert mismatch.amount == 500


def test_a_stripe_refusal_of_one_invoice_is_a_mismatch_and_others_are_collected(
    engine: Engine, settings: Settings, fake_stripe: FakeStripe
) -> None:
    refused, fine = seed(engine), seed(engine)

    class RefuseOne:
        def __init__(self, gateway: StripeGateway) -> None:
            self.gateway = gateway

        def __getattr__(self, name: str) -> Any:
            return getattr(self.gateway, name)

        def create_invoice(self, invoice_id: str, *args: Any) -> StripeInvoice:
            from services.billing.gateway import StripeRefused

            with engine.connect() as connection:
                owner = connection.execute(
                    sa.select(Invoice.subscription_id).where(Invoice.id == invoice_id)
                ).scalar_one()
            if owner == refused["subscription_id"]:
                raise StripeRefused("Stripe refused create_invoice: No such customer")
            return self.gateway.create_invoice(invoice_id, *args)

    gateway = RefuseOne(gateway_for(fake_stripe))
    first = bill(engine, settings, refused, gateway)
    second = bill(engine, settings, fine, gateway)

    assert [(m.kind, m.resolved) for m in first.mismatches] == [("invoice_refused", False)]
    assert final_invoice(engine, refused).stripe_invoice_id is None
    assert final_invoice(engine, fine).stripe_total == final_invoice(engine, fine).total
    assert len(second.collected) == 1
