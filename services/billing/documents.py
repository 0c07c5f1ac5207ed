"""Wire shapes of the operator commands (`meterline subscriptions ...`, `meterline invoices ...`)
and of the console's subscription and invoice routes: what `--json` prints, built from the models
and the billing core's values, and the parties an invoice page names."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

from sqlalchemy.orm import Session

from services.billing.invoice_html import Party
from services.billing.invoices import Invoice, invoice_document
from shared.access import organizations_by_id
from shared.models import Organization, Plan, Subscription, SubscriptionPhase
from shared.settings import Settings
from shared.subscription_repository import phases_of, plans_by_id


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


def subscription_documents(
    session: Session, subscriptions: Sequence[Subscription], *, phases: bool = False
) -> list[dict[str, object]]:
    """The documents of these subscriptions (with their plan phases if asked), their plans and
    organizations read in one query each."""
    found = {s.id: phases_of(session, s.id) for s in subscriptions} if phases else {}
    plan_ids = {s.plan_id for s in subscriptions} | {
        phase.plan_id for listed in found.values() for phase in listed
    }
    plans = plans_by_id(session, plan_ids) if plan_ids else {}
    organizations = organizations_by_id(session, (s.organization_id for s in subscriptions))
    return [
        subscription_document(
            s, organizations[s.organization_id], plans, found.get(s.id) if phases else None
        )
        for s in subscriptions
    ]


def seller_party(settings: Settings) -> Party:
    """Who invoices: METERLINE_SELLER_NAME, and METERLINE_SELLER_ADDRESS split at semicolons."""
    return Party(
        settings.seller_name,
        tuple(part.strip() for part in settings.seller_address.split(";") if part.strip()),
    )


def customer_party(organization: Organization) -> Party:
    lines = [f"Organization {organization.slug} ({organization.id})"]
    if organization.stripe_customer_id:
        lines.append(f"Stripe customer {organization.stripe_customer_id}")
    return Party(organization.name, tuple(lines))


def invoice_summary(invoice: Invoice) -> dict[str, object]:
    """An invoice with the Stripe invoice that collects it."""
    return invoice_document(invoice) | {
        "stripe_invoice_id": invoice.stripe_invoice_id,
        "stripe_status": invoice.stripe_status,
        "stripe_total": invoice.stripe_total,
    }


def _time(moment: object) -> str | None:
    return moment.isoformat() if moment is not None and hasattr(moment, "isoformat") else None
