"""SQL of the Stripe meter report ledger and of reconciliation mismatches, set-based where a run
writes many rows. Every function takes a Connection inside the caller's transaction."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Connection

from services.billing.reporting import MeterReport, ReportKind
from shared.models import ReconciliationMismatch, StripeMeterReport

LedgerKey = tuple[uuid.UUID, str, datetime]

_COLUMNS = (
    StripeMeterReport.id,
    StripeMeterReport.subscription_id,
    StripeMeterReport.metric,
    StripeMeterReport.period_start,
    StripeMeterReport.sequence,
    StripeMeterReport.kind,
    StripeMeterReport.event_name,
    StripeMeterReport.stripe_customer_id,
    StripeMeterReport.value,
    StripeMeterReport.cumulative,
    StripeMeterReport.identifier,
    StripeMeterReport.event_timestamp,
    StripeMeterReport.sent_at,
    StripeMeterReport.attempts,
    StripeMeterReport.first_attempt_at,
    StripeMeterReport.parked_at,
    StripeMeterReport.last_error,
)


def _report(row: Any) -> MeterReport:
    return MeterReport(
        id=cast(uuid.UUID, row[0]),
        subscription_id=cast(uuid.UUID, row[1]),
        metric=cast(str, row[2]),
        period_start=cast(datetime, row[3]),
        sequence=cast(int, row[4]),
        kind=cast(ReportKind, row[5]),
        event_name=cast(str, row[6]),
        customer_id=cast(str, row[7]),
        value=cast(int, row[8]),
        cumulative=cast(int, row[9]),
        identifier=cast(str, row[10]),
        event_timestamp=cast(datetime, row[11]),
        sent_at=cast(datetime | None, row[12]),
        attempts=cast(int, row[13]),
        first_attempt_at=cast(datetime | None, row[14]),
        parked_at=cast(datetime | None, row[15]),
        last_error=cast(str | None, row[16]),
    )


def ledger_rows(
    connection: Connection, subscription_ids: Sequence[uuid.UUID]
) -> dict[LedgerKey, list[MeterReport]]:
    """The report ledger of these subscriptions, by (subscription, metric, period start)."""
    rows: dict[LedgerKey, list[MeterReport]] = defaultdict(list)
    if subscription_ids:
        query = sa.select(*_COLUMNS).where(StripeMeterReport.subscription_id.in_(subscription_ids))
        for row in connection.execute(query):
            report = _report(row)
            rows[(report.subscription_id, report.metric, report.period_start)].append(report)
    return dict(rows)


def reports_of_customers(connection: Connection, customer_ids: Iterable[str]) -> list[MeterReport]:
    """Every report sent to these Stripe customers, whatever subscription it was for."""
    ids = sorted(set(customer_ids))
    if not ids:
        return []
    query = sa.select(*_COLUMNS).where(StripeMeterReport.stripe_customer_id.in_(ids))
    return [_report(row) for row in connection.execute(query)]


def record_intents(connection: Connection, intents: Sequence[MeterReport]) -> None:
    if intents:
        connection.execute(
            sa.insert(StripeMeterReport),
            [
                {
                    "id": r.id,
                    "subscription_id": r.subscription_id,
                    "metric": r.metric,
                    "period_start": r.period_start,
                    "sequence": r.sequence,
                    "kind": r.kind,
                    "event_name": r.event_name,
                    "stripe_customer_id": r.customer_id,
                    "value": r.value,
                    "cumulative": r.cumulative,
                    "identifier": r.identifier,
                    "event_timestamp": r.event_timestamp,
                    "attempts": 0,
                }
                for r in intents
            ],
        )


def unsent_reports(
    connection: Connection, subscription_ids: Sequence[uuid.UUID] | None = None
) -> list[MeterReport]:
    """Reports not sent and not parked, in the order they must reach Stripe."""
    query = (
        sa.select(*_COLUMNS)
        .where(StripeMeterReport.sent_at.is_(None), StripeMeterReport.parked_at.is_(None))
        .order_by(StripeMeterReport.subscription_id, StripeMeterReport.metric)
        .order_by(StripeMeterReport.period_start, StripeMeterReport.sequence)
    )
    if subscription_ids is not None:
        query = query.where(StripeMeterReport.subscription_id.in_(subscription_ids))
    return [_report(row) for row in connection.execute(query)]


def sent_total(
    connection: Connection, customer_id: str, event_name: str, start: datetime, end: datetime
) -> int:
    """What we know Stripe holds for a customer's meter in [start, end): the reports marked sent
    and stamped in it, of any subscription."""
    return int(
        connection.execute(
            sa.select(sa.func.coalesce(sa.func.sum(StripeMeterReport.value), 0)).where(
                StripeMeterReport.stripe_customer_id == customer_id,
                StripeMeterReport.event_name == event_name,
                StripeMeterReport.sent_at.is_not(None),
                StripeMeterReport.event_timestamp >= start,
                StripeMeterReport.event_timestamp < end,
            )
        ).scalar_one()
    )


def mark_attempt(
    connection: Connection, report_id: uuid.UUID, now: datetime, timestamp: datetime
) -> None:
    """Before Stripe is called: Stripe may hold the event from now on (and with this stamp)."""
    connection.execute(
        sa.update(StripeMeterReport)
        .where(StripeMeterReport.id == report_id)
        .values(
            attempts=StripeMeterReport.attempts + 1,
            first_attempt_at=sa.func.coalesce(StripeMeterReport.first_attempt_at, now),
            event_timestamp=timestamp,
        )
    )


def mark_sent(connection: Connection, report_ids: Sequence[uuid.UUID], now: datetime) -> None:
    if report_ids:
        connection.execute(
            sa.update(StripeMeterReport)
            .where(StripeMeterReport.id.in_(report_ids))
            .values(sent_at=now, last_error=None)
        )


def mark_failed(connection: Connection, report_id: uuid.UUID, error: str) -> None:
    connection.execute(
        sa.update(StripeMeterReport)
        .where(StripeMeterReport.id == report_id)
        .values(last_error=error[:500])
    )


def park(
    connection: Connection, report_ids: Sequence[uuid.UUID], now: datetime, error: str
) -> None:
    """Stop sending these reports: Stripe refused them for good, or their fate needs a person."""
    if report_ids:
        connection.execute(
            sa.update(StripeMeterReport)
            .where(StripeMeterReport.id.in_(report_ids))
            .values(parked_at=now, last_error=error[:500])
        )


@dataclass(frozen=True)
class Mismatch:
    """A difference between our records and Stripe's, and what was done about it."""

    subscription_id: uuid.UUID
    kind: str
    ours: str
    theirs: str
    metric: str | None = None
    period_start: datetime | None = None
    amount: Decimal | None = None
    resolved: bool = False
    resolution: str | None = None


def record_mismatch(connection: Connection, run_id: uuid.UUID | None, mismatch: Mismatch) -> None:
    """Record (or refresh) a mismatch; the same finding seen again updates its row."""
    statement = pg.insert(ReconciliationMismatch).values(
        id=uuid.uuid4(),
        run_id=run_id,
        subscription_id=mismatch.subscription_id,
        kind=mismatch.kind,
        metric=mismatch.metric,
        period_start=mismatch.period_start,
        ours=mismatch.ours[:255],
        theirs=mismatch.theirs[:255],
        amount=mismatch.amount,
        resolved=mismatch.resolved,
        resolution=mismatch.resolution,
    )
    connection.execute(
        statement.on_conflict_do_update(
            index_elements=[
                ReconciliationMismatch.subscription_id,
                ReconciliationMismatch.kind,
                ReconciliationMismatch.metric,
                ReconciliationMismatch.period_start,
                ReconciliationMismatch.ours,
                ReconciliationMismatch.theirs,
            ],
            set_={
                "run_id": statement.excluded.run_id,
                # A person's resolution (resolved_at) stands when a run finds the same again.
                "resolved": sa.or_(
                    ReconciliationMismatch.resolved_at.is_not(None), statement.excluded.resolved
                ),
                "resolution": statement.excluded.resolution,
                "updated_at": sa.func.now(),
            },
        )
    )
