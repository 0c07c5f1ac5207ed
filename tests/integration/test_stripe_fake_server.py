"""The stateful Stripe fake itself: it refuses what stripe-mock refuses, keeps meter events once
per identifier, and computes an invoice's total from its own items."""

from __future__ import annotations

import time

import pytest
import stripe

from tests.stripe_fake import FakeStripe


def test_the_fake_refuses_what_stripe_mock_refuses(fake_stripe: FakeStripe) -> None:
    client = stripe.StripeClient("sk_test_123", base_addresses={"api": fake_stripe.base})
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.billing.meter_events.create(
            {"event_name": "api_calls", "payload": {"value": "1"}, "bogus_field": "x"}  # type: ignore[typeddict-unknown-key]
        )
    assert fake_stripe.meter_event_requests == 0


def test_the_fake_keeps_meter_events_once_per_identifier(fake_stripe: FakeStripe) -> None:
    client = stripe.StripeClient("sk_test_123", base_addresses={"api": fake_stripe.base})
    event = {
        "event_name": "api_calls",
        "identifier": "ml_x",
        "timestamp": int(time.time()),
        "payload": {"stripe_customer_id": "cus_1", "value": "7"},
    }
    client.v1.billing.meter_events.create(event)  # type: ignore[arg-type]
    client.v1.billing.meter_events.create(event)  # type: ignore[arg-type]
    assert fake_stripe.meter_total("api_calls", "cus_1", 0, 2**31) == 7


def test_the_fake_totals_an_invoice_from_its_items_and_lists_them_back(
    fake_stripe: FakeStripe,
) -> None:
    client = stripe.StripeClient("sk_test_123", base_addresses={"api": fake_stripe.base})
    invoice = client.v1.invoices.create({"customer": "cus_1", "auto_advance": False})
    for amount in (4900, -1200, 35):
        client.v1.invoice_items.create(
            {"customer": "cus_1", "invoice": invoice.id, "amount": amount, "currency": "usd",
             "metadata": {"meterline_line_id": str(amount)}}
        )  # fmt: skip

    finalized = client.v1.invoices.finalize_invoice(invoice.id, {"auto_advance": True})
    lines = client.v1.invoices.line_items.list(invoice.id)

    assert (finalized.status, finalized.total) == ("open", 3735)
    assert sorted(line.metadata["meterline_line_id"] for line in lines.data) == [
        "-1200", "35", "4900",
    ]  # fmt: skip
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoice_items.create(
            {"customer": "cus_1", "invoice": invoice.id, "amount": 1, "currency": "usd"}
        )
