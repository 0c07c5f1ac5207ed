"""SQL of the Stripe webhook: claim an event id once, record its outcome, find the subscription
an event is about and apply what it changes.

Every function takes a Connection inside the caller's transaction; none commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Connection

from shared.models import StripeWebhookEvent, Subscription


@dataclass(frozen=True, slots=True)
class WebhookSubject:
    """What an event needs of the subscription it is about."""

    id: uuid.UUID
    status: str
    billing_interval: str
    current_period_start: datetime
    current_period_end: datetime
    billing_cycle_anchor: datetime | None
    stripe_event_created: datetime | None
    stripe_subscription_id: str | None


def claim_event(connection: Connection, stripe_event_id: str, kind: str) -> uuid.UUID | None:
    """Record the event id as pending; None when it was recorded before (a replay)."""
    claimed: uuid.UUID | None = connection.execute(
        pg.insert(StripeWebhookEvent)
        .values(id=uuid.uuid4(), stripe_event_id=stripe_event_id, type=kind, outcome="pending")
        .on_conflict_do_nothing(index_elements=[StripeWebhookEvent.stripe_event_id])
        .returning(StripeWebhookEvent.id)
    ).scalar_one_or_none()
    return claimed


def record_outcome(
    connection: Connection,
    claimed: uuid.UUID,
    outcome: str,
    subscription_id: uuid.UUID | None,
) -> None:
    connection.execute(
        sa.update(StripeWebhookEvent)
        .where(StripeWebhookEvent.id == claimed)
        .values(outcome=outcome, subscription_id=subscription_id)
    )


def subscriptions_matching(
    connection: Connection,
    *,
    stripe_subscription_id: str | None,
    subscription_id: uuid.UUID | None,
) -> list[WebhookSubject]:
    """The subscriptions (at most two: enough to tell one from several) with the Stripe id or
    our id; none when neither is given."""
    conditions = []
    if stripe_subscription_id:
        conditions.append(Subscription.stripe_subscription_id == stripe_subscription_id)
    if subscription_id is not None:
        conditions.append(Subscription.id == subscription_id)
    if not conditions:
        return []
    rows = connection.execute(
        sa.select(
            Subscription.id,
            Subscription.status,
            Subscription.billing_interval,
            Subscription.current_period_start,
            Subscription.current_period_end,
            Subscription.billing_cycle_anchor,
            Subscription.stripe_event_created,
            Subscription.stripe_subscription_id,
        )
        .where(sa.or_(*conditions))
        .limit(2)
    ).all()
    return [
        WebhookSubject(
            id=row.id,
            status=str(row.status),
            billing_interval=str(row.billing_interval),
            current_period_start=row.current_period_start,
            current_period_end=row.current_period_end,
            billing_cycle_anchor=row.billing_cycle_anchor,
            stripe_event_created=row.stripe_event_created,
            stripe_subscription_id=row.stripe_subscription_id,
        )
        for row in rows
    ]


@dataclass(frozen=True, slots=True)
class SubscriptionChange:
    """What a subscription event sets on our row; None leaves a column as it is."""

    status: str
    stripe_subscription_id: str | None
    cancel_at_period_end: bool
    stripe_customer_id: str | None = None
    current_period: tuple[datetime, datetime] | None = None
    # Stripe's Unix times, as the event carries them.
    canceled_at: object = None
    trial_end: object = None


def apply_subscription_change(
    connection: Connection,
    subscription_id: uuid.UUID,
    change: SubscriptionChange,
    *,
    event_created: datetime | None,
) -> None:
    """Set the change on the subscription; `event_created` (when known) becomes the newest event
    applied to it. Stripe's Unix times are converted by the database."""
    values: dict[str, object] = {
        "status": change.status,
        "stripe_subscription_id": change.stripe_subscription_id,
        "cancel_at_period_end": change.cancel_at_period_end,
        "updated_at": sa.func.now(),
    }
    values.update(_ordering(event_created))
    if change.stripe_customer_id:
        values["stripe_customer_id"] = change.stripe_customer_id
    if change.current_period is not None:
        values["current_period_start"], values["current_period_end"] = change.current_period
    if change.canceled_at:
        values["canceled_at"] = sa.func.to_timestamp(change.canceled_at)
    if change.trial_end:
        values["trial_end"] = sa.func.to_timestamp(change.trial_end)
    connection.execute(
        sa.update(Subscription).where(Subscription.id == subscription_id).values(values)
    )


def set_subscription_status(
    connection: Connection,
    subscription_id: uuid.UUID,
    status: str,
    *,
    event_created: datetime | None,
) -> None:
    connection.execute(
        sa.update(Subscription)
        .where(Subscription.id == subscription_id)
        .values(status=status, updated_at=sa.func.now(), **_ordering(event_created))
    )


def _ordering(created: datetime | None) -> Mapping[str, object]:
    """The values that record this event as the newest applied, if it carries its time."""
    return {"stripe_event_created": created} if created is not None else {}
