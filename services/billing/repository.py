"""SQL of billing, set-based: subscriptions to bill with their terms, billing states, periods and
cancellations, reconciliation subjects, Stripe customers, the run lock and runs. Invoices are in
invoice_repository.py, usage totals in usage_totals.py, meter reports and mismatches in
report_repository.py.

Every function takes a Connection inside the caller's transaction; none commits.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.billing.periods import Phase
from services.billing.terms import (
    PlanHistory,
    PlanVersionTerms,
    canonical_metered,
)
from shared.db import array_literal, in_array
from shared.models import (
    BillingRun,
    Organization,
    Plan,
    PlanVersion,
    Subscription,
    SubscriptionPhase,
    UsageVersion,
)


@dataclass(frozen=True)
class StoredState:
    fingerprint: str
    valid_from: datetime
    valid_until: datetime | None


@dataclass(frozen=True)
class SubscriptionToBill:
    id: uuid.UUID
    organization_id: uuid.UUID
    organization_name: str
    status: str
    billing_interval: str
    current_period_start: datetime
    current_period_end: datetime
    billing_cycle_anchor: datetime | None
    cancel_at_period_end: bool
    canceled_at: datetime | None
    trial_end: datetime | None
    stripe_subscription_id: str | None
    plan_id: uuid.UUID
    currency: str
    stripe_customer_id: str | None
    usage_version: int | None
    state: StoredState | None


def subscriptions_to_bill(
    connection: Connection,
    *,
    statuses: Iterable[str],
    organization_id: uuid.UUID | None = None,
) -> list[SubscriptionToBill]:
    """The subscriptions in these statuses, with what their billing state depends on."""
    query = (
        sa.select(
            Subscription.id,
            Subscription.organization_id,
            Organization.name,
            Subscription.status,
            Subscription.billing_interval,
            Subscription.current_period_start,
            Subscription.current_period_end,
            Subscription.billing_cycle_anchor,
            Subscription.cancel_at_period_end,
            Subscription.canceled_at,
            Subscription.trial_end,
            Subscription.stripe_subscription_id,
            Subscription.plan_id,
            Plan.currency,
            Organization.stripe_customer_id,
            UsageVersion.version,
            Subscription.billed_fingerprint,
            Subscription.billed_from,
            Subscription.billed_until,
        )
        .join(Plan, Plan.id == Subscription.plan_id)
        .join(Organization, Organization.id == Subscription.organization_id)
        .outerjoin(UsageVersion, UsageVersion.organization_id == Subscription.organization_id)
        .where(Subscription.status.in_(sorted(statuses)))
        .order_by(Subscription.id)
    )
    if organization_id is not None:
        query = query.where(Subscription.organization_id == organization_id)
    return [
        SubscriptionToBill(
            id=row[0],
            organization_id=row[1],
            organization_name=row[2],
            status=str(row[3]),
            billing_interval=str(row[4]),
            current_period_start=row[5],
            current_period_end=row[6],
            billing_cycle_anchor=row[7],
            cancel_at_period_end=row[8],
            canceled_at=row[9],
            trial_end=row[10],
            stripe_subscription_id=row[11],
            plan_id=row[12],
            currency=row[13],
            stripe_customer_id=row[14],
            usage_version=row[15],
            state=StoredState(row[16], row[17], row[18]) if row[16] is not None else None,
        )
        for row in connection.execute(query)
    ]


def phases_of(
    connection: Connection, subscription_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, tuple[Phase, ...]]:
    found: dict[uuid.UUID, list[Phase]] = defaultdict(list)
    if subscription_ids:
        rows = connection.execute(
            sa.select(
                SubscriptionPhase.subscription_id,
                SubscriptionPhase.starts_at,
                SubscriptionPhase.plan_id,
            )
            .where(in_array(SubscriptionPhase.subscription_id, subscription_ids, sa.Uuid))
            .order_by(SubscriptionPhase.subscription_id, SubscriptionPhase.starts_at)
        )
        for subscription_id, starts_at, plan_id in rows:
            found[subscription_id].append(Phase(starts_at, plan_id))
    return {key: tuple(value) for key, value in found.items()}


def plan_histories(
    connection: Connection, plan_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, PlanHistory]:
    """Each plan with every price version it had, oldest first (a plan from before versions
    were kept has its current prices as its only version)."""
    ids = sorted(set(plan_ids))
    if not ids:
        return {}
    plans = {
        row.id: row
        for row in connection.execute(
            sa.select(
                Plan.id,
                Plan.key,
                Plan.name,
                Plan.price_monthly,
                Plan.price_yearly,
                Plan.currency,
                Plan.features,
                Plan.created_at,
            ).where(Plan.id.in_(ids))
        )
    }
    versions: dict[uuid.UUID, list[PlanVersionTerms]] = defaultdict(list)
    rows = connection.execute(
        sa.select(
            PlanVersion.id,
            PlanVersion.plan_id,
            PlanVersion.effective_at,
            PlanVersion.price_monthly,
            PlanVersion.price_yearly,
            PlanVersion.currency,
            PlanVersion.features,
        )
        .where(PlanVersion.plan_id.in_(ids))
        .order_by(PlanVersion.plan_id, PlanVersion.effective_at, PlanVersion.created_at)
    )
    for version_id, plan_id, effective_at, monthly, yearly, currency, features in rows:
        versions[plan_id].append(
            PlanVersionTerms(
                effective_at, monthly, yearly, currency, canonical_metered(features), version_id
            )
        )
    histories = {}
    for plan_id, plan in plans.items():
        found = versions.get(plan_id) or [
            PlanVersionTerms(
                plan.created_at,
                plan.price_monthly,
                plan.price_yearly,
                plan.currency,
                canonical_metered(plan.features),
            )
        ]
        histories[plan_id] = PlanHistory(plan_id, plan.key, plan.name, tuple(found))
    return histories


def plan_catalog_version(connection: Connection) -> str:
    """Changes whenever any plan's prices change (a new version): reruns price again then."""
    count, latest = connection.execute(
        sa.select(sa.func.count(), sa.func.max(PlanVersion.created_at))
    ).one()
    return f"{count}:{latest.isoformat() if latest else ''}"


def record_billing(
    connection: Connection,
    billed: Sequence[tuple[uuid.UUID, datetime, datetime, str, datetime, datetime | None]],
) -> None:
    """Move each subscription to its current period and record what it was billed from:
    (id, period start, period end, fingerprint, valid from, valid until), in one statement. The
    row's updated_at moves only when its period does (the state is billing's own memo)."""
    if not billed:
        return
    connection.execute(
        sa.text(
            "UPDATE subscriptions AS s SET current_period_start = b.start,"
            " current_period_end = b.end_, billed_fingerprint = b.fingerprint,"
            " billed_from = b.from_, billed_until = b.until,"
            " updated_at = CASE WHEN (s.current_period_start, s.current_period_end)"
            "   = (b.start, b.end_) THEN s.updated_at ELSE now() END"
            " FROM unnest(CAST(:ids AS uuid[]), CAST(:starts AS timestamptz[]),"
            "   CAST(:ends AS timestamptz[]), CAST(:fingerprints AS text[]),"
            "   CAST(:froms AS timestamptz[]), CAST(:untils AS timestamptz[]))"
            "   AS b(id, start, end_, fingerprint, from_, until)"
            " WHERE s.id = b.id"
        ),
        {
            "ids": array_literal(b[0] for b in billed),
            "starts": array_literal(b[1] for b in billed),
            "ends": array_literal(b[2] for b in billed),
            "fingerprints": array_literal(b[3] for b in billed),
            "froms": array_literal(b[4] for b in billed),
            "untils": array_literal(b[5] for b in billed),
        },
    )


def cancel_subscriptions(
    connection: Connection, canceled: Sequence[tuple[uuid.UUID, datetime]]
) -> None:
    """Mark subscriptions canceled: (subscription id, canceled at) each."""
    if not canceled:
        return
    connection.execute(
        sa.text(
            "UPDATE subscriptions AS s SET status = 'canceled', canceled_at = c.at,"
            " cancel_at_period_end = false, updated_at = now()"
            " FROM unnest(CAST(:ids AS uuid[]), CAST(:ats AS timestamptz[])) AS c(id, at)"
            " WHERE s.id = c.id"
        ),
        {
            "ids": array_literal(c[0] for c in canceled),
            "ats": array_literal(c[1] for c in canceled),
        },
    )


def set_stripe_customer(
    connection: Connection, organization_id: uuid.UUID, customer_id: str
) -> None:
    connection.execute(
        sa.update(Organization)
        .where(Organization.id == organization_id)
        .values(stripe_customer_id=customer_id)
    )


@dataclass(frozen=True)
class ReconcileSubject:
    id: uuid.UUID
    status: str
    stripe_subscription_id: str | None
    flat_amount: int
    period: tuple[datetime, datetime]
    customer_id: str


def reconciliation_subjects(
    connection: Connection, subscription_ids: Sequence[uuid.UUID]
) -> list[ReconcileSubject]:
    """The subscriptions among these whose organization has a Stripe customer."""
    if not subscription_ids:
        return []
    rows = connection.execute(
        sa.select(
            Subscription.id,
            Subscription.status,
            Subscription.stripe_subscription_id,
            Subscription.billing_interval,
            Plan.price_monthly,
            Plan.price_yearly,
            Subscription.current_period_start,
            Subscription.current_period_end,
            Organization.stripe_customer_id,
        )
        .join(Plan, Plan.id == Subscription.plan_id)
        .join(Organization, Organization.id == Subscription.organization_id)
        .where(Subscription.id.in_(subscription_ids))
        .where(Organization.stripe_customer_id.is_not(None))
        .order_by(Subscription.id)
    )
    return [
        ReconcileSubject(
            id=row[0],
            status=str(row[1]),
            stripe_subscription_id=row[2],
            flat_amount=row[5] if str(row[3]) == "year" else row[4],
            period=(row[6], row[7]),
            customer_id=str(row[8]),
        )
        for row in rows
    ]


def set_status(connection: Connection, subscription_id: uuid.UUID, status: str) -> None:
    connection.execute(
        sa.update(Subscription)
        .where(Subscription.id == subscription_id)
        .values(status=status, updated_at=sa.func.now())
    )


# pg_try_advisory_lock key: "billing" as an int, so no two runs (CLI or scheduler) overlap.
BILLING_LOCK = 0x62696C6C696E67


def try_lock_billing(connection: Connection) -> bool:
    """Take the session-level billing lock if no one holds it."""
    return bool(connection.execute(sa.select(sa.func.pg_try_advisory_lock(BILLING_LOCK))).scalar())


def unlock_billing(connection: Connection) -> None:
    connection.execute(sa.select(sa.func.pg_advisory_unlock(BILLING_LOCK)))


def start_run(connection: Connection, as_of: datetime) -> uuid.UUID:
    """Record a billing run as running; returns its id."""
    run_id = uuid.uuid4()
    connection.execute(
        sa.insert(BillingRun).values(id=run_id, as_of=as_of, dry_run=False, status="running")
    )
    return run_id


def finish_run(
    connection: Connection,
    run_id: uuid.UUID,
    *,
    status: str,
    error: str | None,
    subscriptions: int,
    invoices_changed: int,
    reported: int,
    mismatches: int,
) -> None:
    connection.execute(
        sa.update(BillingRun)
        .where(BillingRun.id == run_id)
        .values(
            status=status,
            finished_at=sa.func.now(),
            subscriptions=subscriptions,
            invoices_changed=invoices_changed,
            reported=reported,
            mismatches=mismatches,
            error=error,
        )
    )
