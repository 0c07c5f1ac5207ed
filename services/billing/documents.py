"""Wire shapes of the operator commands (`meterline subscriptions ...`, `meterline invoices ...`):
what `--json` prints, built from the models and the billing core's values."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from services.billing.invoices import Invoice, invoice_document
from shared.models import Organization, Plan, Subscription, SubscriptionPhase


def subscription_document(
    subscription: Subscription,
    organization: Organization,
    plans: Mapping[uuid.UUID, Plan],
    phases: list[SubscriptionPhase] | None = None,
) -> dict[str, object]:
    plan = plans.get(subscription.plan_id)
    document: dict[str, object] = {
        "id": str(subscription.id),
        "organization_id": str(subscription.organization_id),
        "organization": organization.slug,
        "plan": plan.key if plan else str(subscription.plan_id),
        "status": str(subscription.status),
        "billing_interval": str(subscription.billing_interval),
        "billing_cycle_anchor": _time(subscription.billing_cycle_anchor),
        "current_period_start": _time(subscription.current_period_start),
        "current_period_end": _time(subscription.current_period_end),
        "cancel_at_period_end": subscription.cancel_at_period_end,
        "canceled_at": _time(subscription.canceled_at),
        "trial_end": _time(subscription.trial_end),
        "stripe_subscription_id": subscription.stripe_subscription_id,
        "external_id": subscription.external_id,
    }
    if phases is not None:
        document["phases"] = [
            {
                "starts_at": _time(phase.starts_at),
                "plan": plans[phase.plan_id].key if phase.plan_id in plans else str(phase.plan_id),
            }
            for phase in phases
        ]
    return document


def invoice_summary(invoice: Invoice) -> dict[str, object]:
    """An invoice with the Stripe invoice that collects it."""
    return invoice_document(invoice) | {
        "stripe_invoice_id": invoice.stripe_invoice_id,
        "stripe_status": invoice.stripe_status,
        "stripe_total": invoice.stripe_total,
    }


def _time(moment: object) -> str | None:
    return moment.isoformat() if moment is not None and hasattr(moment, "isoformat") else None
