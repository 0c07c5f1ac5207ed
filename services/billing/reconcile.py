"""Reconciliation: our records against Stripe's, every difference recorded, the safe ones fixed.

Kinds: `status_differs` (fixed: our status follows Stripe's), `price_differs` and `period_differs`
(left for a person: the plan or Stripe's price must change), `usage_not_reported` (Stripe's meter
summary holds less than we reported: fixed by reporting the missing units again under a new
identifier), `usage_over_reported` (Stripe holds more: left for a person; never cancelled).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Connection, Engine

from services.billing.gateway import BillingGateway
from services.billing.reporting import (
    UsageToReport,
    ledger_rows,
    plan_restore,
    record_intents,
)
from services.billing.schemas import plan_price
from shared.models import Organization, Plan, ReconciliationMismatch, Subscription


def reconcile_run(
    engine: Engine,
    gateway: BillingGateway,
    *,
    work_ids: list[uuid.UUID],
    run_id: uuid.UUID | None,
    as_of: datetime,
    now: datetime,
    settle: timedelta = timedelta(0),
) -> list[dict[str, Any]]:
    """Reconcile each Stripe-linked subscription of the run; return the mismatches found.

    `settle`: Stripe aggregates meter events asynchronously, so a period whose last report is
    younger than this is not compared yet (a fresh event missing from a summary is not lost).
    """
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(
                Subscription.id,
                Subscription.status,
                Subscription.billing_interval,
                Subscription.current_period_start,
                Subscription.current_period_end,
                Subscription.stripe_subscription_id,
                Plan.price_monthly,
                Plan.price_yearly,
                Plan.features,
                Organization.stripe_customer_id,
            )
            .join(Plan, Plan.id == Subscription.plan_id)
            .join(Organization, Organization.id == Subscription.organization_id)
            .where(Subscription.id.in_(work_ids))
            .where(Subscription.stripe_subscription_id.is_not(None))
            .order_by(Subscription.id)
        ).all()
        ledgers = ledger_rows(connection, [row.id for row in rows])
    found: list[dict[str, Any]] = []
    for row in rows:
        findings = _subscription_findings(gateway, row)
        findings += _usage_findings(gateway, row, ledgers, now, settle)
        if not findings:
            continue
        with engine.begin() as connection:
            for finding in findings:
                _apply_fix(connection, row, finding, ledgers, now)
                record_mismatch(connection, run_id, row.id, finding)
        found += [_document(row.id, finding) for finding in findings]
    return found


def _subscription_findings(gateway: BillingGateway, row: Any) -> list[dict[str, Any]]:
    theirs = gateway.get_subscription(row.stripe_subscription_id)
    findings = []
    if theirs.status != str(row.status):
        findings.append(
            _finding(
                "status_differs", str(row.status), theirs.status, fix="status", to=theirs.status
            )
        )
    interval = str(row.billing_interval)
    ours_price = row.price_yearly if interval == "year" else row.price_monthly
    if theirs.unit_amount is not None and theirs.unit_amount != ours_price:
        findings.append(
            _finding(
                "price_differs",
                str(ours_price),
                str(theirs.unit_amount),
                amount=Decimal(theirs.unit_amount - ours_price),
            )
        )
    if theirs.period_start is not None and (
        theirs.period_start != row.current_period_start
        or theirs.period_end != row.current_period_end
    ):
        findings.append(
            period_finding(
                (row.current_period_start, row.current_period_end),
                (theirs.period_start, theirs.period_end),
            )
        )
    return findings


def period_finding(
    ours: tuple[datetime, datetime], theirs: tuple[datetime, datetime | None]
) -> dict[str, Any]:
    """`period_differs`: left for a person (our period stays on our anchor grid)."""
    start, end = theirs
    return _finding(
        "period_differs",
        f"{ours[0].isoformat()}/{ours[1].isoformat()}",
        f"{start.isoformat()}/{end.isoformat()}" if end else start.isoformat(),
    )


def _usage_findings(
    gateway: BillingGateway,
    row: Any,
    ledgers: dict[Any, list[dict[str, Any]]],
    now: datetime,
    settle: timedelta,
) -> list[dict[str, Any]]:
    meters = {
        metric: price.stripe_meter
        for metric, price in plan_price(row.features or {}, 0).metered.items()
        if price.stripe_meter
    }
    findings = []
    for (subscription_id, metric, period_start), ledger in sorted(ledgers.items(), key=str):
        if subscription_id != row.id or metric not in meters or not row.stripe_customer_id:
            continue
        sent = [r for r in ledger if r["sent_at"] is not None]
        if not sent or max(r["sent_at"] for r in sent) > now - settle:
            continue
        ours = sum(r["value"] for r in sent if r["kind"] == "usage")
        period_end = _period_end(row, period_start, ledger)
        theirs = gateway.meter_total(
            meters[metric], row.stripe_customer_id, period_start, period_end
        )
        if theirs == ours:
            continue
        common = {"metric": metric, "period_start": period_start, "amount": Decimal(ours - theirs)}
        if theirs < ours:
            findings.append(
                _finding("usage_not_reported", str(ours), str(theirs), fix="restore", **common)
                | {"period_end": period_end, "event_name": meters[metric]}
            )
        else:
            findings.append(_finding("usage_over_reported", str(ours), str(theirs), **common))
    return findings


def _period_end(row: Any, period_start: datetime, ledger: list[dict[str, Any]]) -> datetime:
    if period_start == row.current_period_start:
        return row.current_period_end
    # An earlier period: its events were stamped inside it (at most a second before its end).
    return max(r["event_timestamp"] for r in ledger) + timedelta(seconds=1)


def _finding(kind: str, ours: str, theirs: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "ours": ours,
        "theirs": theirs,
        "metric": None,
        "period_start": None,
    } | extra


def _apply_fix(
    connection: Connection,
    row: Any,
    finding: dict[str, Any],
    ledgers: dict[Any, list[dict[str, Any]]],
    now: datetime,
) -> None:
    fix = finding.get("fix")
    if fix == "status":
        connection.execute(
            sa.update(Subscription)
            .where(Subscription.id == row.id)
            .values(status=finding["to"], updated_at=sa.func.now())
        )
        finding["resolution"] = f"status set to {finding['to']} from Stripe"
    elif fix == "restore":
        usage = UsageToReport(
            row.id,
            row.stripe_customer_id,
            finding["metric"],
            finding["event_name"],
            finding["period_start"],
            finding["period_end"],
            Decimal(0),
        )
        ledger = ledgers[(row.id, finding["metric"], finding["period_start"])]
        intent = plan_restore(usage, ledger, int(finding["amount"]), now)
        record_intents(connection, [intent])
        ledger.append(intent | {"sent_at": None})
        finding["resolution"] = f"reported {intent['value']} missing units ({intent['identifier']})"
    finding["resolved"] = fix is not None


def record_mismatch(
    connection: Connection,
    run_id: uuid.UUID | None,
    subscription_id: uuid.UUID,
    finding: dict[str, Any],
) -> None:
    statement = pg.insert(ReconciliationMismatch).values(
        id=uuid.uuid4(),
        run_id=run_id,
        subscription_id=subscription_id,
        kind=finding["kind"],
        metric=finding["metric"],
        period_start=finding["period_start"],
        ours=finding["ours"][:255],
        theirs=finding["theirs"][:255],
        amount=finding.get("amount"),
        resolved=finding["resolved"],
        resolution=finding.get("resolution"),
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


def _document(subscription_id: uuid.UUID, finding: dict[str, Any]) -> dict[str, Any]:
    amount = finding.get("amount")
    return {
        "subscription_id": str(subscription_id),
        "kind": finding["kind"],
        "metric": finding["metric"],
        "period_start": finding["period_start"].isoformat() if finding["period_start"] else None,
        "ours": finding["ours"],
        "theirs": finding["theirs"],
        "amount": str(amount) if amount is not None else None,
        "resolved": finding["resolved"],
        "resolution": finding.get("resolution"),
    }
