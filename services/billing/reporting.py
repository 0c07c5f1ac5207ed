"""Stripe meter reports: whole-number deltas of each (subscription, metric, period) cumulative.

Order, per subscription (each step keeps "never twice, never skipped"):
  1. the intent row (identifier, value, cumulative) is written in the subscription's unit of work;
  2. after it commits, Stripe is called with the row's deterministic identifier;
  3. the row is marked sent. A crash between 2 and 3 leaves it unsent: the next run resends the
     same identifier, which Stripe deduplicates, so nothing is reported twice or lost.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from services.billing.gateway import BillingGateway, MeterEvent
from shared.models import StripeMeterReport

# Stripe accepts timestamps within the past 35 days; a day of margin keeps a resend valid.
OLDEST_TIMESTAMP = timedelta(days=34)

LedgerKey = tuple[uuid.UUID, str, datetime]


@dataclass(frozen=True)
class UsageToReport:
    subscription_id: uuid.UUID
    customer_id: str
    metric: str
    event_name: str
    period_start: datetime
    period_end: datetime
    total: Decimal


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


def plan_report(
    usage: UsageToReport, ledger: list[dict[str, Any]], now: datetime
) -> dict[str, Any] | None:
    """The next intent for this usage, or None when Stripe already has (or will get) its total.
    A lower total (a correction) gives a negative compensating delta, never a cancel."""
    reported = sum(row["value"] for row in ledger if row["kind"] == "usage")
    cumulative = whole_units(usage.total)
    delta = cumulative - reported
    if delta == 0:
        return None
    sequence = max((row["sequence"] for row in ledger), default=0) + 1
    return _intent(usage, "usage", delta, cumulative, sequence, now)


def plan_restore(
    usage: UsageToReport, ledger: list[dict[str, Any]], missing: int, now: datetime
) -> dict[str, Any]:
    """Resend units Stripe lost: counted apart from `usage` rows so later deltas stay right."""
    reported = sum(row["value"] for row in ledger if row["kind"] == "usage")
    sequence = max((row["sequence"] for row in ledger), default=0) + 1
    return _intent(usage, "restore", missing, reported, sequence, now)


def _intent(
    usage: UsageToReport, kind: str, value: int, cumulative: int, sequence: int, now: datetime
) -> dict[str, Any]:
    return {
        "id": uuid.uuid4(),
        "subscription_id": usage.subscription_id,
        "metric": usage.metric,
        "period_start": usage.period_start,
        "sequence": sequence,
        "kind": kind,
        "event_name": usage.event_name,
        "stripe_customer_id": usage.customer_id,
        "value": value,
        "cumulative": cumulative,
        "identifier": report_identifier(
            usage.subscription_id, usage.metric, usage.period_start, cumulative, sequence
        )
        if kind == "usage"
        else report_identifier(
            usage.subscription_id, f"{usage.metric}#restore", usage.period_start, value, sequence
        ),
        "event_timestamp": event_timestamp(usage.period_end, now),
        "attempts": 0,
    }


def ledger_rows(
    connection: Connection, subscription_ids: list[uuid.UUID]
) -> dict[LedgerKey, list[dict[str, Any]]]:
    rows: dict[LedgerKey, list[dict[str, Any]]] = {}
    if not subscription_ids:
        return rows
    query = sa.select(StripeMeterReport).where(
        StripeMeterReport.subscription_id.in_(subscription_ids)
    )
    for row in connection.execute(query).mappings():
        key = (row["subscription_id"], row["metric"], row["period_start"])
        rows.setdefault(key, []).append(dict(row))
    return rows


def record_intents(connection: Connection, intents: list[dict[str, Any]]) -> None:
    if intents:
        connection.execute(sa.insert(StripeMeterReport), intents)


def unsent_reports(
    connection: Connection, subscription_ids: list[uuid.UUID] | None = None
) -> list[dict[str, Any]]:
    query = (
        sa.select(StripeMeterReport)
        .where(StripeMeterReport.sent_at.is_(None))
        .order_by(StripeMeterReport.subscription_id, StripeMeterReport.metric)
        .order_by(StripeMeterReport.period_start, StripeMeterReport.sequence)
    )
    if subscription_ids is not None:
        query = query.where(StripeMeterReport.subscription_id.in_(subscription_ids))
    return [dict(row) for row in connection.execute(query).mappings()]


def send_unsent(
    engine: Engine,
    gateway: BillingGateway,
    now: datetime,
    subscription_ids: list[uuid.UUID] | None = None,
) -> list[dict[str, Any]]:
    """Send every unsent intent (of these subscriptions), marking each sent after Stripe took it."""
    with engine.connect() as connection:
        pending = unsent_reports(connection, subscription_ids)
    sent = []
    for row in pending:
        timestamp = max(row["event_timestamp"], now - OLDEST_TIMESTAMP)
        try:
            gateway.report_meter_event(
                MeterEvent(
                    event_name=row["event_name"],
                    customer_id=row["stripe_customer_id"],
                    value=row["value"],
                    identifier=row["identifier"],
                    timestamp=timestamp,
                )
            )
        except Exception as exc:
            with engine.begin() as connection:
                connection.execute(
                    sa.update(StripeMeterReport)
                    .where(StripeMeterReport.id == row["id"])
                    .values(attempts=StripeMeterReport.attempts + 1, last_error=str(exc)[:500])
                )
            raise
        with engine.begin() as connection:
            connection.execute(
                sa.update(StripeMeterReport)
                .where(StripeMeterReport.id == row["id"])
                .values(sent_at=now, attempts=StripeMeterReport.attempts + 1, last_error=None)
            )
        sent.append(row | {"sent_at": now})
    return sent


def report_document(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "identifier": row["identifier"],
        "subscription_id": str(row["subscription_id"]),
        "metric": row["metric"],
        "event_name": row["event_name"],
        "period_start": row["period_start"].isoformat(),
        "kind": row["kind"],
        "value": row["value"],
        "cumulative": row["cumulative"],
    }
