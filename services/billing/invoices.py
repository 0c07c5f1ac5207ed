"""Invoices of one subscription: priced usage lines per period, and adjustments for late usage.

A period's invoice is a draft while the period is open and final once it closed. A final invoice
never changes: usage that arrives after it (late events) becomes an adjustment line on the newest
invoice of the subscription, for the difference between the price of the period's true quantity
and what was already billed for it, priced with the pricing snapshot the final invoice stored
(a plan changed since re-prices nothing already final). A period that lies wholly within the
subscription's trial charges no flat fee and, as Stripe does, no usage; a period the trial ends
inside is billed in full (no proration). Pure: values in, the invoices as they should be out.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from services.billing.periods import Period
from services.billing.pricing import (
    ZERO,
    MeteredPrice,
    PlanPrice,
    PricedLine,
    billable_quantity,
    price_metric,
)
from services.billing.schemas import snapshot_price
from shared.events import SUM_CONTEXT, decimal_text

Totals = dict[tuple[datetime, str], Decimal]


@dataclass(frozen=True)
class Subject:
    """What billing needs to know of one subscription."""

    subscription_id: uuid.UUID
    organization_id: uuid.UUID
    currency: str
    plan: PlanPrice
    # The current plan as invoices store it (`plan_snapshot`): drafts are priced with the current
    # plan, so each draft written carries it, and it freezes with the invoice.
    snapshot: dict[str, Any] = field(default_factory=dict)
    trial_end: datetime | None = None

    def in_trial(self, period: Period) -> bool:
        """Whether the whole period lies within the trial. A period the trial ends inside is
        billed in full (flat fee and usage): prorating a partial trial is not supported."""
        return self.trial_end is not None and self.trial_end >= period.end


def _priced(metric: str, quantity: Decimal, price: MeteredPrice, trial: bool) -> PricedLine:
    # As Stripe does, usage during a trial is not charged: the quantity shows, none is billable.
    if trial:
        return PricedLine(metric, quantity, ZERO, 0)
    return price_metric(metric, quantity, price)


def _usage_lines(
    plan: PlanPrice, period: Period, totals: Totals, trial: bool
) -> list[dict[str, Any]]:
    lines = []
    for metric, price in sorted(plan.metered.items()):
        line = _priced(metric, totals.get((period.start, metric), ZERO), price, trial)
        lines.append(
            {
                "metric": metric,
                "kind": "usage",
                "quantity": line.quantity,
                "billable_quantity": line.billable_quantity,
                "amount": line.amount,
                "adjusts_period_start": None,
            }
        )
    return lines


def period_pricing(invoice: dict[str, Any], current: PlanPrice) -> PlanPrice:
    """The pricing of a stored invoice's period: its snapshot; the current plan for invoices from
    before snapshots were stored (the only pricing known for them)."""
    snapshot = invoice.get("plan_snapshot")
    return snapshot_price(snapshot) if snapshot else current


def _period_in_trial(invoice: dict[str, Any], subject: Subject) -> bool:
    snapshot = invoice.get("plan_snapshot")
    if snapshot:
        return bool(snapshot.get("trial"))
    return subject.in_trial(Period(invoice["period_start"], invoice["period_end"]))


def _adjustment_lines(
    subject: Subject,
    frozen: list[dict[str, Any]],
    billed_elsewhere: list[dict[str, Any]],
    totals: Totals,
) -> list[dict[str, Any]]:
    """Adjustments for each final period whose true usage differs from what was billed for it,
    priced as that period was."""
    lines = []
    for invoice in frozen:
        start = invoice["period_start"]
        trial = _period_in_trial(invoice, subject)
        for metric, price in sorted(period_pricing(invoice, subject.plan).metered.items()):
            billed = [
                line
                for line in billed_elsewhere
                if line["metric"] == metric
                and (
                    (line["kind"] == "usage" and line["_period_start"] == start)
                    or (line["kind"] == "adjustment" and line["adjusts_period_start"] == start)
                )
            ]
            billed_quantity = ZERO
            for line in billed:
                billed_quantity = SUM_CONTEXT.add(billed_quantity, line["quantity"])
            billed_amount = sum(line["amount"] for line in billed)
            true = _priced(metric, totals.get((start, metric), ZERO), price, trial)
            if true.quantity == billed_quantity and true.amount == billed_amount:
                continue
            lines.append(
                {
                    "metric": metric,
                    "kind": "adjustment",
                    "quantity": SUM_CONTEXT.subtract(true.quantity, billed_quantity),
                    "billable_quantity": SUM_CONTEXT.subtract(
                        true.billable_quantity,
                        ZERO if trial else billable_quantity(billed_quantity, price),
                    ),
                    "amount": true.amount - billed_amount,
                    "adjusts_period_start": start,
                }
            )
    return lines


def plan_invoices(
    subject: Subject,
    periods: list[Period],
    existing: list[dict[str, Any]],
    totals: Totals,
    as_of: datetime,
) -> list[dict[str, Any]]:
    """Every invoice of the subscription that is not final yet, as it should be after this run
    (`changed_invoices` picks the ones to write).

    `periods` are the periods to invoice (oldest first, the open one last); `existing` the
    subscription's stored invoices that are drafts or recent enough to receive late usage.
    """
    by_start = {invoice["period_start"]: invoice for invoice in existing}
    frozen = [invoice for invoice in existing if invoice["status"] == "final"]
    # Drafts whose period closed (a webhook may have moved the subscription on) are finalised too.
    starts = {period.start for period in periods}
    for invoice in existing:
        if invoice["status"] == "draft" and invoice["period_start"] not in starts:
            periods = [*periods, Period(invoice["period_start"], invoice["period_end"])]
    periods = sorted(periods, key=lambda period: period.start)
    target = next(
        (p for p in reversed(periods) if by_start.get(p.start, {}).get("status") != "final"), None
    )

    desired: list[dict[str, Any]] = []
    for period in periods:
        stored = by_start.get(period.start)
        if stored is not None and stored["status"] == "final":
            continue
        closed = period.closed_at(as_of)
        trial = subject.in_trial(period)
        lines = _usage_lines(subject.plan, period, totals, trial)
        if period == target:
            elsewhere = [
                line | {"_period_start": invoice["period_start"]}
                for invoice in frozen
                for line in invoice["lines"]
            ] + [
                line | {"_period_start": other["period_start"]}
                for other in desired
                for line in other["lines"]
            ]
            lines += _adjustment_lines(subject, frozen, elsewhere, totals)
        elif stored is not None:
            # A draft finalised now keeps the adjustments it already carried; anything newer
            # goes to the target invoice.
            lines += [dict(line) for line in stored["lines"] if line["kind"] == "adjustment"]
        flat_amount = 0 if trial else subject.plan.flat_amount
        snapshot = (subject.snapshot | {"trial": True}) if trial else subject.snapshot
        desired.append(
            {
                "id": stored["id"] if stored else uuid.uuid4(),
                "organization_id": subject.organization_id,
                "subscription_id": subject.subscription_id,
                "period_start": period.start,
                "period_end": period.end,
                "currency": subject.currency,
                "status": "final" if closed else "draft",
                "flat_amount": flat_amount,
                "total": flat_amount + sum(line["amount"] for line in lines),
                "finalized_at": as_of if closed else None,
                "plan_snapshot": snapshot or None,
                "lines": lines,
            }
        )
    return desired


def changed_invoices(
    desired: list[dict[str, Any]], existing: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The desired invoices that differ from what is stored: new ones and changed drafts."""
    by_start = {invoice["period_start"]: invoice for invoice in existing}
    return [
        invoice for invoice in desired if _changed(invoice, by_start.get(invoice["period_start"]))
    ]


def invoices_of_run(
    desired: list[dict[str, Any]], existing: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """What a run lists for one subscription, changed or not, oldest first: the desired invoices
    and the stored final ones it checked for late usage."""
    starts = {invoice["period_start"] for invoice in desired}
    frozen = [
        invoice
        for invoice in existing
        if invoice["status"] == "final" and invoice["period_start"] not in starts
    ]
    return sorted([*frozen, *desired], key=lambda invoice: invoice["period_start"])


#: What a line is: compared to tell a changed invoice, and the columns stored for it.
LINE_FIELDS = (
    "metric",
    "kind",
    "quantity",
    "billable_quantity",
    "amount",
    "adjusts_period_start",
)


def _line_key(line: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(line[k] for k in LINE_FIELDS)


def _line_order(line: dict[str, Any]) -> tuple[str, str, str]:
    adjusts = line["adjusts_period_start"]
    return (line["metric"], line["kind"], adjusts.isoformat() if adjusts else "")


def _changed(desired: dict[str, Any], stored: dict[str, Any] | None) -> bool:
    if stored is None:
        return True
    compared = ("status", "period_end", "flat_amount", "total", "plan_snapshot")
    if any(desired[k] != stored.get(k) for k in compared):
        return True
    ours = [_line_key(line) for line in sorted(desired["lines"], key=_line_order)]
    theirs = [_line_key(line) for line in sorted(stored["lines"], key=_line_order)]
    return ours != theirs


def _document_order(line: dict[str, Any]) -> tuple[bool, str, str]:
    # Usage lines first, then adjustments: the same order for a computed and a stored invoice.
    adjusts = line["adjusts_period_start"]
    return (line["kind"] != "usage", line["metric"], adjusts.isoformat() if adjusts else "")


def invoice_document(invoice: dict[str, Any]) -> dict[str, Any]:
    """The `billing run --json` shape of DESIGN.md section 5."""
    return {
        "id": str(invoice["id"]),
        "organization_id": str(invoice["organization_id"]),
        "subscription_id": str(invoice["subscription_id"]),
        "period_start": invoice["period_start"].isoformat(),
        "period_end": invoice["period_end"].isoformat(),
        "currency": invoice["currency"],
        "status": invoice["status"],
        "flat_amount": invoice["flat_amount"],
        "lines": [
            {
                "metric": line["metric"],
                "quantity": decimal_text(line["quantity"]),
                "billable_quantity": decimal_text(line["billable_quantity"]),
                "amount": line["amount"],
                "kind": line["kind"],
            }
            for line in sorted(invoice["lines"], key=_document_order)
        ],
        "total": invoice["total"],
    }
