"""Subscriptions: list and show them, subscribe an organization to a plan, change the plan, cancel
(now or at the period's end), through the same functions `meterline subscriptions ...` calls."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from services.billing.documents import subscription_documents
from services.billing.plans import find_plan, list_plans
from services.console.routes.invoices import INVOICE_SUMMARY, invoice_documents
from services.console.routing import Call, Operation, Page, Param, Redirect, Render
from services.console.schemas import Document, obj
from shared.audit import record_change
from shared.errors import InvalidInput, NotFound
from shared.models import BillingInterval, Subscription, SubscriptionStatus
from shared.organizations import find_organization
from shared.subscription_repository import list_subscriptions
from shared.subscriptions import (
    LIVE_STATUSES,
    cancel_at_period_end,
    cancel_now,
    change_plan,
    create_subscription,
    get_subscription,
)

MAX_TRIAL_DAYS = 730
STATUSES = tuple(str(status) for status in SubscriptionStatus)
ORGANIZATION = Param("organization", "Only this organization (id or slug).")
STATUS = Param("status", "Only this status.", enum=STATUSES)
LIMIT = Param("limit", "At most this many, newest first.", "integer", minimum=1, maximum=200,
              default=50)  # fmt: skip
SUBSCRIPTION = Param("subscription", "Subscription id.", location="path", required=True)

_TIME = {"type": ["string", "null"], "format": "date-time"}
SUBSCRIPTION_SCHEMA = obj(
    {
        "id": {"type": "string", "format": "uuid"},
        "organization_id": {"type": "string", "format": "uuid"},
        "organization": {"type": "string", "description": "the organization's slug"},
        "plan": {"type": "string", "description": "the plan's key"},
        "status": {"type": "string", "enum": list(STATUSES)},
        "billing_interval": {"type": "string", "enum": ["month", "year"]},
        "billing_cycle_anchor": _TIME,
        "current_period_start": _TIME,
        "current_period_end": _TIME,
        "cancel_at_period_end": {"type": "boolean"},
        "canceled_at": _TIME,
        "trial_end": _TIME,
        "stripe_subscription_id": {"type": ["string", "null"]},
    }
)
DETAIL_SCHEMA = {
    **SUBSCRIPTION_SCHEMA,
    "properties": {
        **SUBSCRIPTION_SCHEMA["properties"],
        "phases": {
            "type": "array",
            "description": "The plan from each instant on (billing splits a period there).",
            "items": obj({"starts_at": _TIME, "plan": {"type": "string"}}),
        },
        "invoices": {"type": "array", "items": INVOICE_SUMMARY},
    },
    "required": [*SUBSCRIPTION_SCHEMA["required"], "phases", "invoices"],
}
CHANGED_SCHEMA = {
    **SUBSCRIPTION_SCHEMA,
    "properties": {
        **SUBSCRIPTION_SCHEMA["properties"],
        "phases": DETAIL_SCHEMA["properties"]["phases"],
    },
    "required": [*SUBSCRIPTION_SCHEMA["required"], "phases"],
}
CREATE_BODY = {
    "type": "object",
    "properties": {
        "organization": {"type": "string", "description": "Organization id or slug."},
        "plan": {"type": "string", "description": "Plan key or id."},
        "interval": {"type": "string", "enum": ["month", "year"], "default": "month"},
        "trial_days": {"type": "integer", "minimum": 0, "maximum": MAX_TRIAL_DAYS, "default": 0},
    },
    "required": ["organization", "plan"],
}
CHANGE_BODY = obj({"plan": {"type": "string", "description": "The new plan's key or id."}})
CANCEL_BODY = {
    "type": "object",
    "properties": {
        "at_period_end": {
            "type": "boolean",
            "default": False,
            "description": "Cancel when the current period ends instead of now.",
        }
    },
}


def _now(call: Call) -> datetime:
    # Whole seconds, as Stripe counts them (and as the command line does).
    return call.now.replace(microsecond=0)


def _subscription_id(call: Call) -> uuid.UUID:
    try:
        return uuid.UUID(call.path["subscription"])
    except ValueError:
        raise NotFound(f"subscription {call.path['subscription']!r} not found") from None


def _text(body: Mapping[str, Any], name: str, problems: list[str]) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{name}: is required, a string")
        return ""
    if "\x00" in value or len(value) > 200:
        problems.append(f"{name}: at most 200 characters, and no NUL character")
    return value.strip()


def _refuse(problems: list[str]) -> None:
    if problems:
        raise InvalidInput("; ".join(problems), details=problems)


def subscriptions(call: Call) -> Document:
    organization = call.arg("organization")
    org_id = find_organization(call.session, organization).id if organization else None
    found = list_subscriptions(
        call.session,
        organization_id=org_id,
        status=SubscriptionStatus(call.arg("status")) if call.arg("status") else None,
        limit=call.arg("limit"),
    )
    return {"items": subscription_documents(call.session, found), "limit": call.arg("limit")}


def subscription(call: Call) -> Document:
    found = get_subscription(call.session, _subscription_id(call))
    [document] = subscription_documents(call.session, [found], phases=True)
    return document | {"invoices": invoice_documents(call, subscription_id=found.id, limit=24)}


def _audit(call: Call, action: str, found: Subscription, **details: object) -> None:
    record_change(
        call.session,
        call.principal.actor,
        action,
        target_type="subscription",
        target_id=found.id,
        details={"organization_id": str(found.organization_id), **details},
    )


def subscribe(call: Call, body: Mapping[str, Any]) -> Subscription:
    problems: list[str] = []
    organization = _text(body, "organization", problems)
    plan = _text(body, "plan", problems)
    interval = body.get("interval", "month")
    if interval not in ("month", "year"):
        problems.append("interval: must be month or year")
    trial_days = body.get("trial_days", 0)
    if (
        not isinstance(trial_days, int)
        or isinstance(trial_days, bool)
        or not 0 <= trial_days <= MAX_TRIAL_DAYS
    ):
        problems.append(f"trial_days: must be a whole number from 0 to {MAX_TRIAL_DAYS}")
    _refuse(problems)
    found_plan = find_plan(call.session, plan)
    created = create_subscription(
        call.session,
        organization_id=find_organization(call.session, organization).id,
        plan_id=found_plan.id,
        interval=BillingInterval(interval),
        now=_now(call),
        trial_days=trial_days,
    )
    _audit(call, "subscription.create", created, plan=found_plan.key, interval=interval,
           trial_days=trial_days)  # fmt: skip
    return created


def move_to_plan(call: Call, body: Mapping[str, Any]) -> Subscription:
    problems: list[str] = []
    plan = _text(body, "plan", problems)
    _refuse(problems)
    found_plan = find_plan(call.session, plan)
    before = get_subscription(call.session, _subscription_id(call)).plan_id
    changed = change_plan(call.session, _subscription_id(call), plan_id=found_plan.id,
                          now=_now(call))  # fmt: skip
    if before != changed.plan_id:
        _audit(call, "subscription.change_plan", changed, plan=found_plan.key,
               previous_plan_id=str(before))  # fmt: skip
    return changed


def cancel(call: Call, body: Mapping[str, Any]) -> Subscription:
    at_period_end = body.get("at_period_end", False)
    if not isinstance(at_period_end, bool):
        raise InvalidInput("at_period_end: must be true or false",
                           details=["at_period_end: must be true or false"])  # fmt: skip
    if at_period_end:
        canceled = cancel_at_period_end(call.session, _subscription_id(call))
    else:
        canceled = cancel_now(call.session, _subscription_id(call), now=_now(call))
    _audit(call, "subscription.cancel", canceled, at_period_end=at_period_end)
    return canceled


def _one(call: Call, found: Subscription) -> Document:
    [document] = subscription_documents(call.session, [found], phases=True)
    return document


_ERRORS_OF_A_CHANGE = (
    "404 when the subscription, organization or plan is not there; 409 when the subscription is "
    "not live, or the organization already has a live one; 422 lists each bad field."
)

operations = [
    Operation(
        "GET",
        "/subscriptions",
        "listSubscriptions",
        "Subscriptions, newest first",
        "subscriptions",
        subscriptions,
        obj(
            {"items": {"type": "array", "items": SUBSCRIPTION_SCHEMA}, "limit": {"type": "integer"}}
        ),
        params=(ORGANIZATION, STATUS, LIMIT),
    ),
    Operation(
        "GET",
        "/subscriptions/{subscription}",
        "getSubscription",
        "A subscription with its plan phases and its newest invoices",
        "subscriptions",
        subscription,
        DETAIL_SCHEMA,
        params=(SUBSCRIPTION,),
    ),
    Operation(
        "POST",
        "/subscriptions",
        "createSubscription",
        "Subscribe an organization to a plan from now on, anchored now",
        "subscriptions",
        lambda call: _one(call, subscribe(call, call.body)),
        {
            **SUBSCRIPTION_SCHEMA,
            "properties": {**SUBSCRIPTION_SCHEMA["properties"], "phases": {"type": "array"}},
        },
        body=CREATE_BODY,
        change=True,
        description=_ERRORS_OF_A_CHANGE,
    ),
    Operation(
        "POST",
        "/subscriptions/{subscription}/change-plan",
        "changeSubscriptionPlan",
        "Move a subscription to another plan from now on",
        "subscriptions",
        lambda call: _one(call, move_to_plan(call, call.body)),
        {
            **SUBSCRIPTION_SCHEMA,
            "properties": {**SUBSCRIPTION_SCHEMA["properties"], "phases": {"type": "array"}},
        },
        params=(SUBSCRIPTION,),
        body=CHANGE_BODY,
        change=True,
        description="Billing splits the current period here (each side on its own plan, the "
        "flat fees prorated as Stripe does). " + _ERRORS_OF_A_CHANGE,
    ),
    Operation(
        "POST",
        "/subscriptions/{subscription}/cancel",
        "cancelSubscription",
        "Cancel a subscription now, or at the end of its current period",
        "subscriptions",
        lambda call: _one(call, cancel(call, call.body)),
        {
            **SUBSCRIPTION_SCHEMA,
            "properties": {**SUBSCRIPTION_SCHEMA["properties"], "phases": {"type": "array"}},
        },
        params=(SUBSCRIPTION,),
        body=CANCEL_BODY,
        change=True,
        description="Now: billing ends now, the flat fee prorated to now. " + _ERRORS_OF_A_CHANGE,
    ),
]


def _active_plans(call: Call) -> list[dict[str, str]]:
    return [
        {"key": plan.key, "name": plan.name, "currency": plan.currency}
        for plan in list_plans(call.session)
        if plan.active
    ]


def _list_page(call: Call) -> Render:
    return Render(
        "subscriptions.html",
        {
            **subscriptions(call),
            "organization": call.arg("organization") or "",
            "status": call.arg("status") or "",
            "statuses": STATUSES,
            "plans": _active_plans(call),
        },
    )


def _detail_page(call: Call) -> Render:
    document = subscription(call)
    return Render(
        "subscription.html",
        {
            "subscription": document,
            "live": document["status"] in {str(s) for s in LIVE_STATUSES},
            "plans": _active_plans(call),
        },
    )


def _trial_days(call: Call) -> object:
    raw = call.form.get("trial_days", "").strip() or "0"
    return int(raw) if raw.isdigit() and len(raw) < 6 else raw


def _create_page(call: Call) -> Redirect:
    created = subscribe(
        call,
        {
            "organization": call.form.get("organization", ""),
            "plan": call.form.get("plan", ""),
            "interval": call.form.get("interval", "month"),
            "trial_days": _trial_days(call),
        },
    )
    return Redirect(f"/subscriptions/{created.id}", "Subscribed: the subscription starts now.")


def _change_page(call: Call) -> Redirect:
    changed = move_to_plan(call, {"plan": call.form.get("plan", "")})
    return Redirect(f"/subscriptions/{changed.id}", "Plan changed from now on.")


def _cancel_page(call: Call) -> Redirect:
    at_end = call.form.get("when") == "period_end"
    canceled = cancel(call, {"at_period_end": at_end})
    notice = "Set to cancel at the period's end." if at_end else "Canceled now."
    return Redirect(f"/subscriptions/{canceled.id}", notice)


pages = [
    Page("GET", "/subscriptions", _list_page, params=(ORGANIZATION, STATUS, LIMIT)),
    Page("GET", "/subscriptions/{subscription}", _detail_page),
    Page("POST", "/subscriptions", _create_page),
    Page("POST", "/subscriptions/{subscription}/change-plan", _change_page),
    Page("POST", "/subscriptions/{subscription}/cancel", _cancel_page),
]
