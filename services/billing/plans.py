"""The plan catalogue: upsert plans from a validated plan file (by key) and list them."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

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
    existing = {
        plan.key: plan for plan in session.scalars(sa.select(Plan).where(Plan.key.in_(keys)))
    }
    outcome: list[tuple[str, str]] = []
    for values in plans:
        plan = existing.get(values["key"])
        if plan is None:
            session.add(Plan(key=values["key"], **{name: values[name] for name in PLAN_FIELDS}))
            outcome.append((values["key"], "created"))
            continue
        changed = False
        for name in PLAN_FIELDS:
            if getattr(plan, name) != values[name]:
                setattr(plan, name, values[name])
                changed = True
        outcome.append((values["key"], "updated" if changed else "unchanged"))
    session.flush()
    return outcome


def find_plan(session: Session, reference: str) -> Plan:
    """A plan by key or id."""
    plan = session.scalar(sa.select(Plan).where(Plan.key == reference))
    if plan is None:
        try:
            plan = session.get(Plan, uuid.UUID(reference))
        except ValueError:
            plan = None
    if plan is None:
        raise NotFound(f"plan {reference!r} not found")
    return plan


def list_plans(session: Session) -> list[Plan]:
    return list(session.scalars(sa.select(Plan).order_by(Plan.key)))


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
