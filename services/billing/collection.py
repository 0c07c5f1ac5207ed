"""Stripe collects what Meterline invoices, the pure part: a final invoice as the items of the
Stripe invoice that charges it, one item per line (flat fees and prorations, usage per segment,
adjustments), so the Stripe invoice holds our lines and its total is ours to the cent.

The order of collecting one invoice (services/billing/service.py runs it; each step survives a
crash before the next):
  1. find the Stripe invoice made for ours (search by metadata), or create it as a draft that does
     not advance by itself (idempotency key on our invoice id); store its id;
  2. add each line not yet on it (the Stripe invoice's lines carry our line ids), so a rerun adds
     nothing twice even after the 24 hours idempotency keys last;
  3. finalize it with automatic collection (Stripe then charges the customer) and store the
     status and total Stripe answered; reconciliation compares that total with ours every run.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.billing.gateway import InvoiceItem
from services.billing.invoices import Invoice, InvoiceLine
from shared.events import decimal_text


def describe_line(line: InvoiceLine) -> str:
    """One line as a customer reads it on the Stripe invoice."""
    if line.kind == "flat":
        return line.description or "Plan fee"
    quantity = decimal_text(line.quantity)
    billable = decimal_text(line.billable_quantity)
    what = f"{line.metric}: {quantity}"
    if billable != quantity:
        what += f" ({billable} billable)"
    if line.kind == "adjustment":
        return f"{line.description or 'Late usage'}, {what}"
    if line.segment_start and line.segment_end:
        what += f", {line.segment_start:%Y-%m-%d %H:%M:%S} to {line.segment_end:%Y-%m-%d %H:%M:%S}"
    return what


def invoice_items(invoice: Invoice) -> list[InvoiceItem]:
    """One item per line. A line is known to Stripe by the invoice's id and its position: a final
    invoice's lines never change, so the key is stable across runs."""
    items = []
    for position, line in enumerate(invoice.lines):
        items.append(
            InvoiceItem(
                line_id=f"{invoice.id}:{position}",
                amount=line.amount,
                currency=invoice.currency,
                description=describe_line(line),
                period_start=line.segment_start or invoice.period_start,
                period_end=line.segment_end or invoice.period_end,
            )
        )
    return items


def missing_items(items: Iterable[InvoiceItem], present: set[str]) -> list[InvoiceItem]:
    return [item for item in items if item.line_id not in present]


def invoice_description(invoice: Invoice) -> str:
    if invoice.is_adjustment_only:
        return f"Meterline adjustments, {invoice.period_start:%Y-%m-%d}"
    return f"Meterline invoice {invoice.period_start:%Y-%m-%d} to {invoice.period_end:%Y-%m-%d}"
