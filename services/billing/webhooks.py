"""Stripe webhook events applied to our subscriptions, each Stripe event id at most once.

The processed-event row and the subscription change share one transaction: a replayed event id
finds its row and changes nothing; a failed one leaves no row and is processed when Stripe retries.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Connection

from services.billing.gateway import subscription_from_stripe
from shared.models import StripeWebhookEvent, Subscription

# A paid invoice brings these back to active; a failed payment makes an active one past_due.
_RECOVERS_ON_PAYMENT = ("past_due", "unpaid", "incomplete")


def apply_stripe_event(connection: Connection, event: dict[str, Any]) -> str:
    """Apply one verified Stripe event; returns its outcome (`duplicate` when seen before)."""
    claimed = connection.execute(
        pg.insert(StripeWebhookEvent)
        .values(id=uuid.uuid4(), stripe_event_id=event["id"], type=event["type"], outcome="pending")
        .on_conflict_do_nothing(index_elements=[StripeWebhookEvent.stripe_event_id])
        .returning(StripeWebhookEvent.id)
    ).scalar_one_or_none()
    if claimed is None:
        return "duplicate"
    obj = event["data"]["object"]
    kind = event["type"]
    subscription_id: uuid.UUID | None = None
    if kind.startswith("customer.subscription."):
        subscription_id, outcome = _apply_subscription(connection, kind, obj)
    elif kind.startswith("invoice."):
        subscription_id, outcome = _apply_invoice(connection, kind, obj)
    else:
        outcome = "ignored"
    connection.execute(
        sa.update(StripeWebhookEvent)
        .where(StripeWebhookEvent.id == claimed)
        .values(outcome=outcome, subscription_id=subscription_id)
    )
    return outcome


def _find(connection: Connection, stripe_id: str | None, metadata: dict[str, Any]) -> Any:
    ours = metadata.get("meterline_subscription_id")
    condition = Subscription.stripe_subscription_id == stripe_id
    if ours:
        with contextlib.suppress(ValueError):
            condition = sa.or_(condition, Subscription.id == uuid.UUID(ours))
    return connection.execute(
        sa.select(Subscription.id, Subscription.status).where(condition).limit(1)
    ).one_or_none()


def _apply_subscription(
    connection: Connection, kind: str, obj: dict[str, Any]
) -> tuple[uuid.UUID | None, str]:
    found = _find(connection, obj.get("id"), obj.get("metadata") or {})
    if found is None:
        return None, "unknown_subscription"
    theirs = subscription_from_stripe(obj)
    values: dict[str, Any] = {
        "status": "canceled" if kind == "customer.subscription.deleted" else theirs.status,
        "stripe_subscription_id": theirs.id,
        "cancel_at_period_end": bool(obj.get("cancel_at_period_end")),
        "updated_at": sa.func.now(),
    }
    if theirs.customer_id:
        values["stripe_customer_id"] = theirs.customer_id
    if theirs.period_start and theirs.period_end:
        values["current_period_start"] = theirs.period_start
        values["current_period_end"] = theirs.period_end
    for field in ("canceled_at", "trial_end", "billing_cycle_anchor"):
        if obj.get(field):
            values[field] = sa.func.to_timestamp(obj[field])
    connection.execute(sa.update(Subscription).where(Subscription.id == found.id).values(values))
    return found.id, "subscription_updated"


def _invoice_subscription(obj: dict[str, Any]) -> str | None:
    # Newer API versions put it under parent.subscription_details; older ones on the invoice.
    parent = (obj.get("parent") or {}).get("subscription_details") or {}
    found = parent.get("subscription") or obj.get("subscription")
    return found if isinstance(found, str) else (found or {}).get("id")


def _apply_invoice(
    connection: Connection, kind: str, obj: dict[str, Any]
) -> tuple[uuid.UUID | None, str]:
    found = _find(connection, _invoice_subscription(obj), {})
    if found is None:
        return None, "unknown_subscription"
    status = str(found.status)
    if kind in ("invoice.paid", "invoice.payment_succeeded") and status in _RECOVERS_ON_PAYMENT:
        new_status = "active"
    elif kind == "invoice.payment_failed" and status in ("active", "trialing"):
        new_status = "past_due"
    else:
        return found.id, "no_change"
    connection.execute(
        sa.update(Subscription)
        .where(Subscription.id == found.id)
        .values(status=new_status, updated_at=sa.func.now())
    )
    return found.id, f"status_{new_status}"
