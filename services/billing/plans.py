"""The plan catalogue: upsert plans from a validated plan file (by key) and list them."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from services.billing.plan_repository import (
    add_plan,
    all_plans,
    plan_by_id,
    plan_by_key,
    plans_by_key,
    save_plans,
)
from services.billing.schemas import PLAN_FIELDS, validate_plan_file
from shared.errors import InvalidInput, NotFound
from shared.models import Plan


def read_plan_file(path: Path) -> list[dict[str, Any]]:
    """Parse a JSON or YAML plan file and validate every plan in it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
    return parse_plan_text(text, source=str(path), as_json=path.suffix.lower() == ".json")


def parse_plan_text(text: str, *, source: str, as_json: bool = False) -> list[dict[str, Any]]:
    """Parse a plan document (JSON when `as_json`, else YAML, which also reads JSON) and validate
    every plan in it; `source` names it in errors (a file's path, or "plans" for pasted text)."""
    import json

    import yaml

    try:
        # Floats are parsed as floats on purpose: validation refuses them where the schema wants
        # decimal strings, so "0.05" must be quoted and no binary fraction reaches a price.
        document = json.loads(text) if as_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidInput(f"{source}: not valid JSON or YAML: {first}") from None
    return validate_plan_document(document)


def validate_plan_document(document: Any) -> list[dict[str, Any]]:
    """The plans of a parsed plan document, validated (InvalidInput naming each bad field)."""
    _refuse_nul(document, "plans")
    return validate_plan_file(document)


def _refuse_nul(value: Any, path: str) -> None:
    """PostgreSQL text and JSONB cannot hold U+0000: name where it is instead of failing there."""
    if isinstance(value, str) and "\x00" in value:
        raise InvalidInput(f"{path}: contains a NUL character")
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_nul(str(key), path)
            _refuse_nul(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_nul(item, f"{path}[{index}]")


def apply_plans(session: Session, plans: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Create or update each plan by key; returns (key, created|updated|unchanged) per plan."""
    keys = [plan["key"] for plan in plans]
    existing = plans_by_key(session, keys)
    outcome: list[tuple[str, str]] = []
    for values in plans:
        plan = existing.get(values["key"])
        if plan is None:
            fields = {name: values[name] for name in PLAN_FIELDS}
            add_plan(session, Plan(key=values["key"], **fields))
            outcome.append((values["key"], "created"))
            continue
        changed = False
        for name in PLAN_FIELDS:
            if getattr(plan, name) != values[name]:
                setattr(plan, name, values[name])
                changed = True
        outcome.append((values["key"], "updated" if changed else "unchanged"))
    save_plans(session)
    return outcome


def find_plan(session: Session, reference: str) -> Plan:
    """A plan by key or id."""
    plan = plan_by_key(session, reference)
    if plan is None:
        try:
            plan = plan_by_id(session, uuid.UUID(reference))
        except ValueError:
            plan = None
    if plan is None:
        raise NotFound(f"plan {reference!r} not found")
    return plan


def list_plans(session: Session) -> list[Plan]:
    return all_plans(session)


def plan_document(plan: Plan) -> dict[str, Any]:
    return {
        "id": str(plan.id),
        "key": plan.key,
        "name": plan.name,
        "description": plan.description,
        "price_monthly": plan.price_monthly,
        "price_yearly": plan.price_yearly,
        "currency": plan.currency,
        "stripe_price_id_monthly": plan.stripe_price_id_monthly,
        "stripe_price_id_yearly": plan.stripe_price_id_yearly,
        "features": plan.features,
        "active": plan.active,
    }
