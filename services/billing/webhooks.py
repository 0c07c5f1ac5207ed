"""Stripe webhook events applied to our subscriptions, each Stripe event id at most once.

The processed-event row and the subscription change share one transaction: a replayed event id
finds its row and changes nothing; a failed one leaves no row and is processed when Stripe retries.
Stripe does not deliver events in order: an event older (by its `created`) than the last one
applied to the subscription is recorded as processed (`stale`) and changes nothing. Events
created in the same second cannot be ordered; the later delivery wins. An event that does not
name exactly one of our subscriptions changes nothing and is recorded as `unmatched`.
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Connection

from services.billing.gateway import subscription_from_stripe
from services.billing.reconcile import period_finding
from services.billing.report_repository import record_mismatch
from services.billing.webhook_repository import (
    SubscriptionChange,
    WebhookSubject,
    apply_subscription_change,
    claim_event,
    record_outcome,
    set_subscription_status,
    subscriptions_matching,
)
from shared.subscriptions import next_period

# A paid invoice brings these back to active; a failed payment makes an active one past_due.
_RECOVERS_ON_PAYMENT = ("past_due", "unpaid", "incomplete")


def apply_stripe_event(connection: Connection, event: dict[str, Any]) -> str:
    """Apply one verified Stripe event; returns its outcome (`duplicate` when seen before)."""
    claimed = claim_event(connection, event["id"], event["type"])
    if claimed is None:
        return "duplicate"
    obj = event["data"]["object"]
    kind = event["type"]
    created = _created(event)
    subscription_id: uuid.UUID | None = None
    if kind.startswith("customer.subscription."):
        subscription_id, outcome = _apply_subscription(connection, kind, obj, created)
    elif kind.startswith("invoice."):
        subscription_id, outcome = _apply_invoice(connection, kind, obj, created)
    else:
        outcome = "ignored"
    record_outcome(connection, claimed, outcome, subscription_id)
    return outcome


def _created(event: dict[str, Any]) -> datetime | None:
    created = event.get("created")
    if isinstance(created, int) and not isinstance(created, bool):
        return datetime.fromtimestamp(created, UTC)
    return None


def _stale(found: WebhookSubject, created: datetime | None) -> bool:
    """Whether a newer event was already applied to this subscription."""
    last = found.stripe_event_created
    return created is not None and last is not None and created < last


def _find(connection: Connection, stripe_id: object, metadata: object) -> WebhookSubject | None:
    """The one subscription a Stripe object is about, or None: matched by its Stripe id, or by
    the meterline_subscription_id we put in its metadata (before the two are linked, and on the
    invoices Meterline creates, which belong to no Stripe subscription).

    Never a guess: an object with neither, no match, two candidates, or an object of one Stripe
    subscription naming our row already linked to another is no match at all, so an event can
    never change a subscription it is not about."""
    theirs = stripe_id if isinstance(stripe_id, str) and stripe_id else None
    ours_text = metadata.get("meterline_subscription_id") if isinstance(metadata, dict) else None
    ours: uuid.UUID | None = None
    if isinstance(ours_text, str):
        with contextlib.suppress(ValueError):
            ours = uuid.UUID(ours_text)
    found = subscriptions_matching(connection, stripe_subscription_id=theirs, subscription_id=ours)
    if len(found) != 1:
        return None
    [row] = found
    if theirs and row.stripe_subscription_id is not None and row.stripe_subscription_id != theirs:
        return None
    return row


def _continues_our_grid(found: WebhookSubject, start: datetime, end: datetime) -> bool:
    """Whether Stripe's period is the anchored period that follows our current one. Moving onto
    anything else would make the next run invoice an overlapping period (or skip one)."""
    anchor = found.billing_cycle_anchor or found.current_period_start
    following = next_period(anchor, found.current_period_end, str(found.billing_interval))
    return (start, end) == following


def _apply_subscription(
    connection: Connection, kind: str, obj: dict[str, Any], created: datetime | None
) -> tuple[uuid.UUID | None, str]:
    found = _find(connection, obj.get("id"), obj.get("metadata"))
    if found is None:
        return None, "unmatched"
    if _stale(found, created):
        return found.id, "stale"
    theirs = subscription_from_stripe(obj)
    outcome = "subscription_updated"
    period: tuple[datetime, datetime] | None = None
    ours = (found.current_period_start, found.current_period_end)
    if (
        theirs.period_start
        and theirs.period_end
        and (theirs.period_start, theirs.period_end) != ours
    ):
        if _continues_our_grid(found, theirs.period_start, theirs.period_end):
            period = (theirs.period_start, theirs.period_end)
        else:
            finding = period_finding(found.id, ours, (theirs.period_start, theirs.period_end))
            record_mismatch(connection, None, finding)
            outcome = "period_differs"
    # Not billing_cycle_anchor: our anchor defines our periods; a different one at Stripe shows
    # as period_differs, for a person to settle.
    change = SubscriptionChange(
        status="canceled" if kind == "customer.subscription.deleted" else theirs.status,
        stripe_subscription_id=theirs.id,
        cancel_at_period_end=bool(obj.get("cancel_at_period_end")),
        stripe_customer_id=theirs.customer_id,
        current_period=period,
        canceled_at=obj.get("canceled_at"),
        trial_end=obj.get("trial_end"),
    )
    apply_subscription_change(connection, found.id, change, event_created=created)
    return found.id, outcome


def _invoice_subscription(obj: dict[str, Any]) -> str | None:
    # Newer API versions put it under parent.subscription_details; older ones on the invoice.
    # Either may be absent (a one-off invoice), an id, or an expanded object.
    parent = obj.get("parent")
    details = parent.get("subscription_details") if isinstance(parent, dict) else None
    found = (details.get("subscription") if isinstance(details, dict) else None) or obj.get(
        "subscription"
    )
    if isinstance(found, dict):
        found = found.get("id")
    return found if isinstance(found, str) and found else None


def _apply_invoice(
    connection: Connection, kind: str, obj: dict[str, Any], created: datetime | None
) -> tuple[uuid.UUID | None, str]:
    found = _find(connection, _invoice_subscription(obj), obj.get("metadata"))
    if found is None:
        return None, "unmatched"
    if _stale(found, created):
        return found.id, "stale"
    status = str(found.status)
    if kind in ("invoice.paid", "invoice.payment_succeeded") and status in _RECOVERS_ON_PAYMENT:
        new_status = "active"
    elif kind == "invoice.payment_failed" and status in ("active", "trialing"):
        new_status = "past_due"
    else:
        return found.id, "no_change"
    set_subscription_status(connection, found.id, new_status, event_created=created)
    return found.id, f"status_{new_status}"
