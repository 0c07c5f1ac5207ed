"""Stripe meter reports, the pure part: whole-number deltas of each (subscription, metric, period)
cumulative, their identifiers and timestamps, and what to do with a report whose fate is unknown.

Order, per report (services/billing/service.py runs it; each step keeps "never twice, never lost"):
  1. the intent row (identifier, value, cumulative, timestamp) is written in the subscription's
     unit of work;
  2. before Stripe is called, the attempt is recorded (first_attempt_at), so a later run knows
     Stripe may hold the event;
  3. Stripe is called with the row's deterministic identifier; the row is marked sent. A crash
     between 2 and 3 leaves it unsent: within Stripe's identifier window (24 hours) the next run
     resends the same identifier, which Stripe deduplicates. Past the window, an identifier no
     longer protects a resend, so the run first compares Stripe's summary of the event's minute
     with what we know Stripe holds there (`stale_decision`);
  4. a report Stripe refuses for good (an invalid request, an unknown customer) is parked as a
     mismatch for a person, and the other reports go on.
Meter events are for visibility in Stripe: Meterline's own invoice is what Stripe charges, so
the meters must not be attached to a price (README).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from typing import Literal

# Stripe accepts timestamps within the past 35 days; a day of margin keeps a resend valid.
OLDEST_TIMESTAMP = timedelta(days=34)
# Stripe keeps an identifier unique over at least 24 hours; an hour of margin.
IDENTIFIER_WINDOW = timedelta(hours=23)

ReportKind = Literal["usage", "restore"]


@dataclass(frozen=True)
class UsageToReport:
    subscription_id: uuid.UUID
    customer_id: str
    metric: str
    event_name: str
    period_start: datetime
    period_end: datetime
    total: Decimal


@dataclass(frozen=True)
class MeterReport:
    """One row of the report ledger (`stripe_meter_reports`)."""

    id: uuid.UUID
    subscription_id: uuid.UUID
    metric: str
    period_start: datetime
    sequence: int
    kind: ReportKind
    event_name: str
    customer_id: str
    value: int
    cumulative: int
    identifier: str
    event_timestamp: datetime
    sent_at: datetime | None = None
    attempts: int = 0
    first_attempt_at: datetime | None = None
    parked_at: datetime | None = None
    last_error: str | None = None


def whole_units(total: Decimal) -> int:
    """The reportable part of a cumulative total; the fraction is carried to the next report."""
    return int(total.to_integral_value(rounding=ROUND_FLOOR))


def report_identifier(
    subscription_id: uuid.UUID, metric: str, period_start: datetime, cumulative: int, sequence: int
) -> str:
    """Derived from what the event reports, so a resend is recognised by Stripe as the same event.
    The sequence is part of it because a corrected total can come back to an earlier value."""
    basis = f"{subscription_id}|{metric}|{period_start.isoformat()}|{cumulative}|{sequence}"
    return "ml_" + hashlib.sha256(basis.encode()).hexdigest()[:48]


def event_timestamp(period_end: datetime, now: datetime) -> datetime:
    """Inside the period when possible, never in the future, never older than Stripe accepts."""
    return max(min(now, period_end - timedelta(seconds=1)), now - OLDEST_TIMESTAMP)


def reported_units(ledger: Sequence[MeterReport]) -> int:
    """What the ledger has told (or parked) of the cumulative: later deltas start from it."""
    return sum(row.value for row in ledger if row.kind == "usage")


def plan_report(
    usage: UsageToReport, ledger: Sequence[MeterReport], now: datetime
) -> MeterReport | None:
    """The next intent for this usage, or None when Stripe already has (or will get) its total.
    A lower total (a correction) gives a negative compensating delta, never a cancel."""
    cumulative = whole_units(usage.total)
    delta = cumulative - reported_units(ledger)
    if delta == 0:
        return None
    sequence = max((row.sequence for row in ledger), default=0) + 1
    return _intent(usage, "usage", delta, cumulative, sequence, now)


def plan_restore(
    usage: UsageToReport, ledger: Sequence[MeterReport], missing: int, now: datetime
) -> MeterReport:
    """Resend units Stripe lost: counted apart from `usage` rows so later deltas stay right."""
    sequence = max((row.sequence for row in ledger), default=0) + 1
    return _intent(usage, "restore", missing, reported_units(ledger), sequence, now)


def _intent(
    usage: UsageToReport,
    kind: ReportKind,
    value: int,
    cumulative: int,
    sequence: int,
    now: datetime,
) -> MeterReport:
    identifier = (
        report_identifier(
            usage.subscription_id, usage.metric, usage.period_start, cumulative, sequence
        )
        if kind == "usage"
        else report_identifier(
            usage.subscription_id, f"{usage.metric}#restore", usage.period_start, value, sequence
        )
    )
    return MeterReport(
        id=uuid.uuid4(),
        subscription_id=usage.subscription_id,
        metric=usage.metric,
        period_start=usage.period_start,
        sequence=sequence,
        kind=kind,
        event_name=usage.event_name,
        customer_id=usage.customer_id,
        value=value,
        cumulative=cumulative,
        identifier=identifier,
        event_timestamp=event_timestamp(usage.period_end, now),
    )


def is_stale(report: MeterReport, now: datetime) -> bool:
    """Whether Stripe may hold this unsent report from an attempt older than its identifier
    window: resending it blindly could count it twice."""
    return (
        report.attempts > 0
        and report.first_attempt_at is not None
        and report.first_attempt_at < now - IDENTIFIER_WINDOW
    )


def minute_of(moment: datetime) -> tuple[datetime, datetime]:
    """The minute holding `moment`: Stripe's event summaries take minute-aligned ranges."""
    start = moment.replace(second=0, microsecond=0)
    return start, start + timedelta(minutes=1)


StaleDecision = Literal["received", "resend", "unknown"]


def stale_decision(theirs: int, known_sent: int, stale: Sequence[MeterReport]) -> StaleDecision:
    """What Stripe's summary of a minute says of the stale reports stamped in it: `theirs` is the
    summary, `known_sent` what we know Stripe holds there (reports marked sent). If Stripe holds
    exactly those, none of the stale ones arrived (resend them); if it holds them all as well,
    they all arrived (mark them sent); anything else needs a person (park them)."""
    pending = sum(report.value for report in stale)
    if theirs == known_sent:
        return "resend"
    if theirs == known_sent + pending:
        return "received"
    return "unknown"


def ceil_minute(moment: datetime) -> datetime:
    start = moment.replace(second=0, microsecond=0)
    return start if start == moment else start + timedelta(minutes=1)
