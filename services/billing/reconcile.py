"""Reconciliation: our records against Stripe's, every difference a mismatch, the safe ones fixed.
Pure: what Stripe answered comes in as values; services/billing/service.py asks and records.

Kinds:
  - `invoice_total_differs`: the Stripe invoice that collects a final invoice of ours has another
    total (someone edited it in Stripe): left for a person, never re-priced;
  - `invoice_not_collected`: that Stripe invoice was voided or marked uncollectible: a person;
  - `usage_not_reported`: Stripe's meter summary holds less than we know we sent in a range:
    fixed by reporting the missing units again under a new identifier;
  - `usage_over_reported`: Stripe holds more: left for a person, never cancelled;
  - for a subscription still linked to a Stripe subscription (an earlier release made them):
    `status_differs` (fixed: ours follows Stripe's), `price_differs` and `period_differs` (a
    person: Meterline invoices the subscription itself, so the Stripe subscription should be
    canceled or it charges its price too).
  - from the report step: `report_refused` (Stripe refused a meter event for good) and
    `report_unknown` (a report older than Stripe's identifier window whose arrival Stripe's
    summary cannot tell): parked for a person.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from services.billing.gateway import StripeInvoice, StripeSubscription
from services.billing.report_repository import Mismatch
from services.billing.reporting import MeterReport, ceil_minute


@dataclass(frozen=True)
class Finding:
    """A mismatch and the fix that resolves it, if it is a safe one."""

    mismatch: Mismatch
    status_to: str | None = None  # fix: set our status to Stripe's
    restore: int = 0  # fix: report this many missing units again
    event_name: str | None = None
    period_end: datetime | None = None


def period_finding(
    subscription_id: uuid.UUID,
    ours: tuple[datetime, datetime],
    theirs: tuple[datetime, datetime | None],
) -> Mismatch:
    """`period_differs`: left for a person (our period stays on our anchor grid)."""
    start, end = theirs
    return Mismatch(
        subscription_id,
        "period_differs",
        f"{ours[0].isoformat()}/{ours[1].isoformat()}",
        f"{start.isoformat()}/{end.isoformat()}" if end else start.isoformat(),
    )


def subscription_findings(
    subscription_id: uuid.UUID,
    status: str,
    flat_amount: int,
    period: tuple[datetime, datetime],
    theirs: StripeSubscription,
) -> list[Finding]:
    found = []
    if theirs.status != status:
        found.append(
            Finding(
                Mismatch(subscription_id, "status_differs", status, theirs.status),
                status_to=theirs.status,
            )
        )
    if theirs.unit_amount is not None and theirs.unit_amount != flat_amount:
        found.append(
            Finding(
                Mismatch(
                    subscription_id,
                    "price_differs",
                    str(flat_amount),
                    str(theirs.unit_amount),
                    amount=Decimal(theirs.unit_amount - flat_amount),
                )
            )
        )
    if theirs.period_start is not None and (theirs.period_start, theirs.period_end) != period:
        found.append(
            Finding(
                period_finding(subscription_id, period, (theirs.period_start, theirs.period_end))
            )
        )
    return found


def invoice_findings(
    subscription_id: uuid.UUID, period_start: datetime, total: int, theirs: StripeInvoice
) -> list[Finding]:
    if theirs.status in ("void", "uncollectible"):
        return [
            Finding(
                Mismatch(
                    subscription_id,
                    "invoice_not_collected",
                    f"final {total}",
                    f"{theirs.id} {theirs.status}",
                    period_start=period_start,
                    amount=Decimal(total),
                )
            )
        ]
    if theirs.total != total:
        return [
            Finding(
                Mismatch(
                    subscription_id,
                    "invoice_total_differs",
                    str(total),
                    f"{theirs.total} ({theirs.id})",
                    period_start=period_start,
                    amount=Decimal(total - theirs.total),
                )
            )
        ]
    return []


@dataclass(frozen=True)
class UsageRange:
    """What we know we sent for one subscription's metric and period, over the minute-aligned
    range its reports are compared in. Ranges of consecutive periods tile time (each runs from
    its start to its end, both rounded up to a minute), so a missing unit is found once."""

    subscription_id: uuid.UUID
    metric: str
    event_name: str
    customer_id: str
    period_start: datetime
    period_end: datetime
    start: datetime
    end: datetime
    ours: int


def usage_ranges(
    subscription_id: uuid.UUID,
    customer_id: str,
    periods: dict[datetime, datetime],
    ledger: Iterable[tuple[str, datetime, Sequence[MeterReport]]],
    customer_reports: Sequence[MeterReport],
    *,
    now: datetime,
    settle: datetime,
) -> list[UsageRange]:
    """The ranges to compare for a subscription: each (metric, period) it reported to Stripe
    whose last report is older than `settle` (Stripe aggregates asynchronously). Our side counts
    every sent report of the customer's meter stamped in the range, whatever its subscription."""
    ranges = []
    for metric, period_start, rows in ledger:
        period_end = periods.get(period_start)
        sent = [r for r in rows if r.sent_at is not None]
        if period_end is None or not sent:
            continue
        event_name = sent[-1].event_name
        if max(r.sent_at for r in sent if r.sent_at is not None) > settle:
            continue
        start, end = ceil_minute(period_start), ceil_minute(min(period_end, now))
        if end <= start:
            continue
        # The cumulatives (usage deltas) are what Stripe should hold; restores stand in for
        # usage events Stripe lost, so they are not counted again.
        ours = sum(
            r.value
            for r in customer_reports
            if r.sent_at is not None
            and r.kind == "usage"
            and r.event_name == event_name
            and start <= r.event_timestamp < end
        )
        ranges.append(
            UsageRange(
                subscription_id,
                metric,
                event_name,
                customer_id,
                period_start,
                period_end,
                start,
                end,
                ours,
            )
        )
    return ranges


def usage_finding(usage: UsageRange, theirs: int) -> Finding | None:
    if theirs == usage.ours:
        return None
    mismatch = Mismatch(
        usage.subscription_id,
        "usage_not_reported" if theirs < usage.ours else "usage_over_reported",
        str(usage.ours),
        str(theirs),
        metric=usage.metric,
        period_start=usage.period_start,
        amount=Decimal(usage.ours - theirs),
    )
    if theirs < usage.ours:
        return Finding(
            mismatch,
            restore=usage.ours - theirs,
            event_name=usage.event_name,
            period_end=usage.period_end,
        )
    return Finding(mismatch)


def mismatch_document(mismatch: Mismatch) -> dict[str, object]:
    return {
        "subscription_id": str(mismatch.subscription_id),
        "kind": mismatch.kind,
        "metric": mismatch.metric,
        "period_start": mismatch.period_start.isoformat() if mismatch.period_start else None,
        "ours": mismatch.ours,
        "theirs": mismatch.theirs,
        "amount": str(mismatch.amount) if mismatch.amount is not None else None,
        "resolved": mismatch.resolved,
        "resolution": mismatch.resolution,
    }
