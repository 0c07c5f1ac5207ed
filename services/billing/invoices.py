"""Invoices of one subscription: flat fees, priced usage per segment, adjustments for late usage.

A period's invoice is a draft while the period is open and final once it closed. Its lines:
  - flat: the plan's fee for the period, and, the way Stripe prorates, at each plan change inside
    the period a credit for the unused time on the old plan and a charge for the remaining time
    on the new one, and at a cancellation a credit for the time after it. Each is
    round_half_up(fee x time from that instant to the anchored period end / length of the
    period), so a period's flat fees are exact to the second (Stripe counts seconds too);
  - usage: each metric of each segment's plan, priced on that plan from zero (its included
    quantity and tiers apply to the segment, as Stripe prices each subscription item's usage);
  - adjustment: a final invoice never changes, so usage that reaches a final period later
    (late events) is priced as that period was and the difference goes on the newest open
    invoice of the subscription, or, when it has none (it was canceled), on an adjustment
    invoice of its own.
A period that lies wholly within the trial charges no flat fee and, as Stripe does, no usage; a
period the trial ends inside is billed in full (no proration). Pure: values in, invoices out.
"""

from __future__ import annotations

import functools
import itertools
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from services.billing.periods import Period, Phase, Segment, segments_of
from services.billing.pricing import (
    ZERO,
    MeteredPrice,
    PricedLine,
    price_metric,
    prorated,
)
from services.billing.terms import InvoicePricing, PlanHistory, SegmentTerms, iso
from shared.events import SUM_CONTEXT, decimal_text

LineKind = Literal["usage", "adjustment", "flat"]
InvoiceStatus = Literal["draft", "final"]
#: (segment start, segment end, metric) -> quantity, for one subscription.
Totals = Mapping[tuple[datetime, datetime, str], Decimal]


@dataclass(frozen=True)
class InvoiceLine:
    kind: LineKind
    metric: str | None
    quantity: Decimal
    billable_quantity: Decimal
    amount: int
    adjusts_period_start: datetime | None = None
    segment_start: datetime | None = None
    segment_end: datetime | None = None
    # The plan of a computed line (not stored: a usage line's segment names it in the pricing).
    plan_id: uuid.UUID | None = field(default=None, compare=False)
    description: str = ""

    def key(self) -> tuple[object, ...]:
        """What the line is, to tell a changed invoice (the id aside)."""
        return (
            self.kind,
            self.metric or "",
            self.adjusts_period_start.isoformat() if self.adjusts_period_start else "",
            self.segment_start.isoformat() if self.segment_start else "",
            self.quantity,
            self.billable_quantity,
            self.amount,
            self.segment_end.isoformat() if self.segment_end else "",
            self.description,
        )


@dataclass(frozen=True)
class Invoice:
    id: uuid.UUID
    organization_id: uuid.UUID
    subscription_id: uuid.UUID
    period_start: datetime
    period_end: datetime
    currency: str
    status: InvoiceStatus
    flat_amount: int
    total: int
    finalized_at: datetime | None
    pricing: InvoicePricing | None
    lines: tuple[InvoiceLine, ...]
    stripe_invoice_id: str | None = None
    stripe_status: str | None = None
    stripe_total: int | None = None

    @property
    def is_adjustment_only(self) -> bool:
        """An invoice of late usage alone, for a subscription with no open invoice left."""
        return self.period_start == self.period_end


@dataclass(frozen=True)
class Subject:
    """What billing needs to know of one subscription: its plans over time."""

    subscription_id: uuid.UUID
    organization_id: uuid.UUID
    currency: str
    interval: str
    plan_id: uuid.UUID
    plans: Mapping[uuid.UUID, PlanHistory]
    phases: tuple[Phase, ...] = ()
    trial_end: datetime | None = None

    def in_trial(self, period: Period) -> bool:
        """Whether the whole period lies within the trial. A period the trial ends inside is
        billed in full (flat fee and usage): prorating a partial trial is not supported."""
        return self.trial_end is not None and self.trial_end >= period.end

    def pricing(self, period: Period, as_of: datetime) -> InvoicePricing:
        """The period's segments, each on its plan as that plan stood at the segment's end (or
        at `as_of`, while the segment is open)."""
        segments = (
            segments_of(period, self.phases, self.plan_id)
            if self.phases
            else [Segment(period.start, period.end, self.plan_id)]
        )
        return _pricing(
            tuple(
                (segment.start, segment.end, self.plans[segment.plan_id]) for segment in segments
            ),
            self.interval,
            as_of,
            self.in_trial(period),
        )


# Subscriptions anchored alike (all on the 1st, say) share their periods' pricings: each distinct
# one is built once per process, and its lines below once too. Values in, values out: caching is
# safe because every argument is an immutable value.
@functools.lru_cache(maxsize=20_000)
def _pricing(
    segments: tuple[tuple[datetime, datetime, PlanHistory], ...],
    interval: str,
    as_of: datetime,
    trial: bool,
) -> InvoicePricing:
    terms = []
    for start, end, history in segments:
        ended = end <= as_of
        version = history.as_of(end if ended else as_of, ended=ended)
        terms.append(
            SegmentTerms(
                start,
                end,
                history.plan_id,
                history.key,
                history.name,
                version.flat_amount(interval),
                version.metered_json,
                version.id,
            )
        )
    return InvoicePricing(tuple(terms), trial=trial)


def _priced(metric: str, quantity: Decimal, price: MeteredPrice, trial: bool) -> PricedLine:
    # As Stripe does, usage during a trial is not charged: the quantity shows, none is billable.
    # No usage costs nothing in every model (and is the most common line of all).
    if trial or not quantity:
        return PricedLine(metric, quantity, ZERO, 0)
    return price_metric(metric, quantity, price)


def _time(moment: datetime) -> str:
    return iso(moment).replace("+00:00", "Z")


@functools.lru_cache(maxsize=20_000)
def flat_lines(period: Period, pricing: InvoicePricing) -> tuple[InvoiceLine, ...]:
    """The period's flat fee, and the prorations of its plan changes and cancellation."""
    return tuple(_flat_lines(period, pricing))


def _flat_lines(period: Period, pricing: InvoicePricing) -> list[InvoiceLine]:
    if pricing.trial or not pricing.segments:
        return []
    end = period.anchored_end
    whole = end - period.start
    first = pricing.segments[0]
    lines = [
        InvoiceLine(
            "flat",
            None,
            Decimal(1),
            Decimal(1),
            first.flat_amount,
            segment_start=period.start,
            segment_end=end,
            plan_id=first.plan_id,
            description=f"{first.plan_name or 'Plan'} fee, {_time(period.start)} to {_time(end)}",
        )
    ]
    for before, after in itertools.pairwise(pricing.segments):
        remaining = end - after.start
        lines.append(
            _proration(
                before,
                -prorated(before.flat_amount, remaining, whole),
                after.start,
                end,
                f"Unused time on {before.plan_name or 'the previous plan'} from "
                f"{_time(after.start)}",
            )
        )
        lines.append(
            _proration(
                after,
                prorated(after.flat_amount, remaining, whole),
                after.start,
                end,
                f"Remaining time on {after.plan_name or 'the new plan'} from {_time(after.start)}",
            )
        )
    if period.scheduled_end is not None:
        last = pricing.segments[-1]
        lines.append(
            _proration(
                last,
                -prorated(last.flat_amount, end - period.end, whole),
                period.end,
                end,
                f"Unused time on {last.plan_name or 'the plan'} after the cancellation at "
                f"{_time(period.end)}",
            )
        )
    return lines


def _proration(
    terms: SegmentTerms, amount: int, start: datetime, end: datetime, description: str
) -> InvoiceLine:
    return InvoiceLine(
        "flat",
        None,
        Decimal(1),
        Decimal(1),
        amount,
        segment_start=start,
        segment_end=end,
        plan_id=terms.plan_id,
        description=description,
    )


def usage_lines(pricing: InvoicePricing, totals: Totals) -> list[InvoiceLine]:
    lines = []
    for segment in pricing.segments:
        for metric, price in segment.sorted_metered:
            quantity = totals.get((segment.start, segment.end, metric), ZERO)
            if quantity is ZERO:
                # No usage at all costs nothing (the most common line of all): one line per
                # segment and metric serves every invoice.
                lines.append(_unused_line(segment, metric))
                continue
            priced = _priced(metric, quantity, price, pricing.trial)
            lines.append(
                InvoiceLine(
                    "usage",
                    metric,
                    priced.quantity,
                    priced.billable_quantity,
                    priced.amount,
                    segment_start=segment.start,
                    segment_end=segment.end,
                    plan_id=segment.plan_id,
                )
            )
    return lines


@functools.lru_cache(maxsize=20_000)
def _unused_line(segment: SegmentTerms, metric: str) -> InvoiceLine:
    return InvoiceLine(
        "usage",
        metric,
        ZERO,
        ZERO,
        0,
        segment_start=segment.start,
        segment_end=segment.end,
        plan_id=segment.plan_id,
    )


@dataclass
class _Billed:
    """What was billed so far for one (final period, metric)."""

    quantity: Decimal = ZERO
    billable: Decimal = ZERO
    amount: int = 0


@dataclass
class _Ledger:
    billed: dict[tuple[datetime, str], _Billed] = field(default_factory=dict)

    def add(self, period_start: datetime, line: InvoiceLine) -> None:
        if line.metric is None:
            return
        entry = self.billed.setdefault((period_start, line.metric), _Billed())
        entry.quantity = SUM_CONTEXT.add(entry.quantity, line.quantity)
        entry.billable = SUM_CONTEXT.add(entry.billable, line.billable_quantity)
        entry.amount += line.amount


def _billed_so_far(invoices: Sequence[Invoice]) -> _Ledger:
    ledger = _Ledger()
    for invoice in invoices:
        for line in invoice.lines:
            if line.kind == "usage":
                ledger.add(invoice.period_start, line)
            elif line.kind == "adjustment" and line.adjusts_period_start is not None:
                ledger.add(line.adjusts_period_start, line)
    return ledger


def adjustment_lines(
    frozen: Sequence[Invoice], others: Sequence[Invoice], totals: Totals
) -> list[InvoiceLine]:
    """For each final period whose true usage differs from what was billed for it (on it and in
    earlier adjustments, in `frozen` and `others`), the difference, priced as that period was."""
    if not frozen:
        return []
    billed = _billed_so_far([*frozen, *others])
    lines = []
    for invoice in frozen:
        if invoice.pricing is None or invoice.is_adjustment_only:
            continue
        true: dict[str, _Billed] = {}
        for segment in invoice.pricing.segments:
            for metric, price in segment.price.metered.items():
                quantity = totals.get((segment.start, segment.end, metric), ZERO)
                priced = _priced(metric, quantity, price, invoice.pricing.trial)
                entry = true.setdefault(metric, _Billed())
                entry.quantity = SUM_CONTEXT.add(entry.quantity, priced.quantity)
                entry.billable = SUM_CONTEXT.add(entry.billable, priced.billable_quantity)
                entry.amount += priced.amount
        for metric in sorted(true):
            now = true[metric]
            was = billed.billed.get((invoice.period_start, metric), _Billed())
            if now.quantity == was.quantity and now.amount == was.amount:
                continue
            lines.append(
                InvoiceLine(
                    "adjustment",
                    metric,
                    SUM_CONTEXT.subtract(now.quantity, was.quantity),
                    SUM_CONTEXT.subtract(now.billable, was.billable),
                    now.amount - was.amount,
                    adjusts_period_start=invoice.period_start,
                    description=f"Late usage of {_time(invoice.period_start)} to "
                    f"{_time(invoice.period_end)}",
                )
            )
    return lines


def _invoice(
    subject: Subject,
    invoice_id: uuid.UUID,
    start: datetime,
    end: datetime,
    status: InvoiceStatus,
    finalized_at: datetime | None,
    pricing: InvoicePricing | None,
    lines: Sequence[InvoiceLine],
) -> Invoice:
    flat = sum(line.amount for line in lines if line.kind == "flat")
    return Invoice(
        id=invoice_id,
        organization_id=subject.organization_id,
        subscription_id=subject.subscription_id,
        period_start=start,
        period_end=end,
        currency=subject.currency,
        status=status,
        flat_amount=flat,
        total=sum(line.amount for line in lines),
        finalized_at=finalized_at,
        pricing=pricing,
        lines=tuple(lines),
    )


def plan_invoices(
    subject: Subject,
    periods: Sequence[Period],
    existing: Sequence[Invoice],
    totals: Totals,
    as_of: datetime,
    pricings: Mapping[Period, InvoicePricing] | None = None,
) -> list[Invoice]:
    """Every invoice of the subscription that is not final yet, as it should be after this run
    (`changed_invoices` picks the ones to write), and a new adjustment invoice when late usage
    of a final period has no open invoice to go on.

    `periods` are the periods to invoice (oldest first, the open one last); `existing` the
    subscription's stored invoices that are drafts or recent enough to receive late usage;
    `pricings` the periods' pricings when the caller computed them already.
    """
    by_start = {invoice.period_start: invoice for invoice in existing}
    frozen = [invoice for invoice in existing if invoice.status == "final"]
    # Drafts whose period is not among the periods (a webhook moved the subscription on) are
    # finalised too, as the periods they cover.
    planned = list(periods)
    starts = {period.start for period in planned}
    for invoice in existing:
        if invoice.status == "draft" and invoice.period_start not in starts:
            planned.append(Period(invoice.period_start, invoice.period_end))
    planned.sort(key=lambda period: period.start)
    open_periods = [
        p for p in planned if p.start not in by_start or by_start[p.start].status != "final"
    ]
    target = open_periods[-1] if open_periods else None

    desired: list[Invoice] = []
    for period in open_periods:
        stored = by_start.get(period.start)
        closed = period.closed_at(as_of)
        pricing = (pricings or {}).get(period) or subject.pricing(period, as_of)
        lines = [*flat_lines(period, pricing), *usage_lines(pricing, totals)]
        if period == target:
            lines += adjustment_lines(frozen, desired, totals)
        elif stored is not None:
            # A draft finalised now keeps the adjustments it already carried; anything newer
            # goes to the target invoice.
            lines += [line for line in stored.lines if line.kind == "adjustment"]
        desired.append(
            _invoice(
                subject,
                stored.id if stored else uuid.uuid4(),
                period.start,
                period.end,
                "final" if closed else "draft",
                as_of if closed else None,
                pricing,
                lines,
            )
        )
    if target is None:
        late = adjustment_lines(frozen, [], totals)
        if late:
            taken = {invoice.period_start for invoice in existing}
            at = max([as_of, *(i.period_end for i in existing)])
            while at in taken:
                at += timedelta(microseconds=1)
            desired.append(
                _invoice(subject, uuid.uuid4(), at, at, "final", as_of, InvoicePricing(()), late)
            )
    return desired


def changed_invoices(desired: Sequence[Invoice], existing: Sequence[Invoice]) -> list[Invoice]:
    """The desired invoices that differ from what is stored: new ones and changed drafts."""
    by_start = {invoice.period_start: invoice for invoice in existing}
    return [invoice for invoice in desired if _changed(invoice, by_start.get(invoice.period_start))]


def invoices_of_run(desired: Sequence[Invoice], existing: Sequence[Invoice]) -> list[Invoice]:
    """What a run lists for one subscription, changed or not, oldest first: the desired invoices
    and the stored final ones it checked for late usage."""
    starts = {invoice.period_start for invoice in desired}
    frozen = [
        invoice
        for invoice in existing
        if invoice.status == "final" and invoice.period_start not in starts
    ]
    return sorted([*frozen, *desired], key=lambda invoice: invoice.period_start)


def _changed(desired: Invoice, stored: Invoice | None) -> bool:
    if stored is None:
        return True
    if (desired.status, desired.period_end, desired.flat_amount, desired.total) != (
        stored.status,
        stored.period_end,
        stored.flat_amount,
        stored.total,
    ):
        return True
    if desired.pricing != stored.pricing:
        return True
    return sorted(line.key() for line in desired.lines) != sorted(
        line.key() for line in stored.lines
    )


def _line_order(line: InvoiceLine) -> tuple[int, str, str, str]:
    # Flat fees first, then usage by segment and metric, then adjustments: the same order for a
    # computed and a stored invoice.
    rank = {"flat": 0, "usage": 1, "adjustment": 2}[line.kind]
    segment = line.segment_start.isoformat() if line.segment_start else ""
    adjusts = line.adjusts_period_start.isoformat() if line.adjusts_period_start else ""
    return (rank, segment if line.kind != "flat" else "", line.metric or "", adjusts)


def ordered_lines(invoice: Invoice) -> list[InvoiceLine]:
    flat = [line for line in invoice.lines if line.kind == "flat"]
    rest = sorted((line for line in invoice.lines if line.kind != "flat"), key=_line_order)
    return [*flat, *rest]


def invoice_document(invoice: Invoice) -> dict[str, object]:
    """The `billing run --json` shape of DESIGN.md section 5 (and `flat_lines`, `segments`)."""
    return {
        "id": str(invoice.id),
        "organization_id": str(invoice.organization_id),
        "subscription_id": str(invoice.subscription_id),
        "period_start": invoice.period_start.isoformat(),
        "period_end": invoice.period_end.isoformat(),
        "currency": invoice.currency,
        "status": invoice.status,
        "flat_amount": invoice.flat_amount,
        "flat_lines": [
            {"description": line.description, "amount": line.amount}
            for line in ordered_lines(invoice)
            if line.kind == "flat"
        ],
        "lines": [
            {
                "metric": line.metric,
                "quantity": decimal_text(line.quantity),
                "billable_quantity": decimal_text(line.billable_quantity),
                "amount": line.amount,
                "kind": line.kind,
                **(
                    {"segment_start": line.segment_start.isoformat()}
                    if line.kind == "usage" and line.segment_start
                    else {}
                ),
                **(
                    {"adjusts_period_start": line.adjusts_period_start.isoformat()}
                    if line.adjusts_period_start
                    else {}
                ),
            }
            for line in ordered_lines(invoice)
            if line.kind != "flat"
        ],
        "total": invoice.total,
    }
