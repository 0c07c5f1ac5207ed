"""The `billing run --json` invoice shape: quantities as plain decimal strings, never exponents."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

from services.billing.invoices import Invoice, InvoiceLine, invoice_document


def invoice_with(quantity: Decimal) -> Invoice:
    return Invoice(
        id=uuid.uuid4(),
        organization_id=uuid.uuid4(),
        subscription_id=uuid.uuid4(),
        period_start=datetime(2026, 11, 1, tzinfo=UTC),
        period_end=datetime(2026, 12, 1, tzinfo=UTC),
        currency="usd",
        status="draft",
        flat_amount=0,
        total=0,
        finalized_at=None,
        pricing=None,
        lines=(InvoiceLine("usage", "m", quantity, quantity, 0),),
    )


def test_a_tiny_quantity_prints_as_a_plain_decimal_string() -> None:
    [line] = invoice_document(invoice_with(Decimal("1.0E-7")))["lines"]
    assert (line["quantity"], line["billable_quantity"]) == ("0.0000001", "0.0000001")


def test_a_quantity_beyond_28_digits_prints_every_digit() -> None:
    # A million events of 1e12 with 12 places sum to 31 significant digits.
    total = "1000000000000000000.000000000001"
    [line] = invoice_document(invoice_with(Decimal(total)))["lines"]
    assert line["quantity"] == total


def test_trailing_zeros_and_positive_exponents_print_plainly() -> None:
    for stored, printed in (("1.50", "1.5"), ("1E+3", "1000"), ("0E-12", "0")):
        [line] = invoice_document(invoice_with(Decimal(stored)))["lines"]
        assert line["quantity"] == printed
