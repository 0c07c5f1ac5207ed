"""Plans: the catalogue, and applying plans from a JSON or YAML document (by key), validated with
errors that name the field, exactly as `meterline plans apply` does."""

from __future__ import annotations

from typing import Any

from services.billing.plans import (
    apply_plans,
    list_plans,
    parse_plan_text,
    plan_document,
    validate_plan_document,
)
from services.console.routing import Call, Operation, Page, Redirect, Render
from services.console.schemas import Document, obj
from shared.audit import record_change
from shared.errors import InvalidInput

PLAN_SCHEMA = {
    "type": "object",
    "description": "A plan as `meterline plans apply` reads it (features: see the README).",
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "key": {"type": "string"},
        "name": {"type": "string"},
        "description": {"type": ["string", "null"]},
        "price_monthly": {"type": "integer", "description": "minor units"},
        "price_yearly": {"type": "integer", "description": "minor units"},
        "currency": {"type": "string"},
        "stripe_price_id_monthly": {"type": ["string", "null"]},
        "stripe_price_id_yearly": {"type": ["string", "null"]},
        "features": {"type": "object"},
        "active": {"type": "boolean"},
    },
}
APPLY_BODY = {
    "type": "object",
    "description": 'A plan document: {"plans": [...]}, each plan as in a plan file.',
    "properties": {"plans": {"type": "array", "items": {"type": "object"}}},
    "required": ["plans"],
}
APPLIED = obj(
    {
        "plans": {
            "type": "array",
            "items": obj(
                {
                    "key": {"type": "string"},
                    "result": {"type": "string", "enum": ["created", "updated", "unchanged"]},
                }
            ),
        }
    }
)


def plans(call: Call) -> Document:
    return {"items": [plan_document(plan) for plan in list_plans(call.session)]}


def apply(call: Call, validated: list[dict[str, Any]]) -> list[tuple[str, str]]:
    outcome = apply_plans(call.session, validated)
    changed = [(key, result) for key, result in outcome if result != "unchanged"]
    if changed:
        record_change(
            call.session,
            call.principal.actor,
            "plans.apply",
            target_type="plan",
            target_id=",".join(key for key, _ in changed)[:100],
            details={"plans": [{"key": key, "result": result} for key, result in changed]},
        )
    return outcome


def _apply_document(call: Call) -> Document:
    outcome = apply(call, validate_plan_document(call.body))
    return {"plans": [{"key": key, "result": result} for key, result in outcome]}


operations = [
    Operation(
        "GET",
        "/plans",
        "listPlans",
        "List plans",
        "plans",
        plans,
        obj({"items": {"type": "array", "items": PLAN_SCHEMA}}),
    ),
    Operation(
        "POST",
        "/plans/apply",
        "applyPlans",
        "Create or update plans by key",
        "plans",
        _apply_document,
        APPLIED,
        body=APPLY_BODY,
        change=True,
        description="Validates every plan first; 422 lists each bad field by its path "
        "(e.g. plans[0].features.metered.api_calls.tiers[1].up_to) and nothing is written.",
    ),
]

EXAMPLE = """plans:
  - key: starter
    name: Starter
    currency: usd
    price_monthly: 2900
    features:
      metered:
        api_calls:
          model: per_unit
          included: 10000
          unit_amount: "0.05"
"""


def _page(call: Call, *, text: str = EXAMPLE, problems: list[str] | None = None) -> Render:
    return Render(
        "plans.html",
        {
            "plans": [plan_document(plan) for plan in list_plans(call.session)],
            "text": text,
            "problems": problems or [],
        },
        422 if problems else 200,
    )


def _apply_page(call: Call) -> Render | Redirect:
    text = call.form.get("document", "")
    try:
        validated = parse_plan_text(text, source="plans")
    except InvalidInput as exc:
        details = exc.details if isinstance(exc.details, list) else [exc.message]
        return _page(call, text=text, problems=[str(d) for d in details])
    outcome = apply(call, validated)
    summary = ", ".join(f"{key} {result}" for key, result in outcome) or "nothing to apply"
    return Redirect("/plans", f"Applied plans: {summary}.")


pages = [
    Page("GET", "/plans", _page),
    Page("POST", "/plans/apply", _apply_page),
]
