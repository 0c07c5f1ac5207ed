"""Wire shapes of billing: the plan file (`plans apply`) and `plans.features`, validated with errors
that name the field path, e.g. `plans[1].features.metered.api_calls.tiers[2].up_to: must be ...`."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from typing import Any, cast

from services.billing.pricing import (
    Aggregation,
    Match,
    MeteredPrice,
    PlanPrice,
    PricedFilter,
    PriceModel,
    Tier,
    filter_label,
)
from shared.errors import InvalidInput

MODELS = ("per_unit", "package", "graduated", "volume")
AGGREGATIONS = ("sum", "max")
_METRIC = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_KEY = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}$")
_CURRENCY = re.compile(r"^[a-z]{3}$")
_MAX_AMOUNT = 10**12


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")


def _decimal_string(value: Any, path: str, problems: _Problems) -> Decimal | None:
    if not isinstance(value, str | int) or isinstance(value, bool):
        problems.add(path, 'must be a decimal string such as "0.05"')
        return None
    try:
        parsed = Decimal(str(value))
    except InvalidOperation:
        problems.add(path, 'must be a decimal string such as "0.05"')
        return None
    if not parsed.is_finite() or parsed < 0:
        problems.add(path, "must be a finite, non-negative decimal")
        return None
    return parsed


def _int(value: Any, path: str, problems: _Problems, *, minimum: int = 0) -> int | None:
    if not isinstance(value, int) or isinstance(value, bool):
        problems.add(path, "must be an integer (minor units)")
        return None
    if value < minimum or value > _MAX_AMOUNT:
        problems.add(path, f"must be an integer between {minimum} and {_MAX_AMOUNT}")
        return None
    return value


#: The fields of a plan besides its `key`: what a plan file may set and `plans apply` writes.
PLAN_FIELDS = (
    "name",
    "description",
    "price_monthly",
    "price_yearly",
    "currency",
    "stripe_price_id_monthly",
    "stripe_price_id_yearly",
    "features",
    "active",
)


def _unknown(data: dict[str, Any], allowed: set[str], path: str, problems: _Problems) -> None:
    for name in sorted(set(data) - allowed):
        problems.add(f"{path}.{name}", "is not a known field")


def _tiers(value: Any, path: str, problems: _Problems) -> tuple[Tier, ...]:
    if not isinstance(value, list) or not value:
        problems.add(path, "must be a non-empty list of tiers")
        return ()
    tiers: list[Tier] = []
    previous: Decimal | None = None
    for index, raw in enumerate(value):
        here = f"{path}[{index}]"
        if not isinstance(raw, dict):
            problems.add(here, "must be an object")
            continue
        _unknown(raw, {"up_to", "unit_amount", "flat_amount"}, here, problems)
        last = index == len(value) - 1
        up_to: Decimal | None = None
        if "up_to" not in raw:
            problems.add(f"{here}.up_to", "is required (null on the last tier)")
        elif raw["up_to"] is None:
            if not last:
                problems.add(f"{here}.up_to", "must be a number; only the last tier is null")
        else:
            up_to = _decimal_string(raw["up_to"], f"{here}.up_to", problems)
            if last:
                problems.add(f"{here}.up_to", "must be null on the last tier")
            elif up_to is not None and (up_to <= 0 or (previous is not None and up_to <= previous)):
                problems.add(
                    f"{here}.up_to", "must be positive and greater than the previous tier's"
                )
            previous = up_to if up_to is not None else previous
        unit_amount = _decimal_string(raw.get("unit_amount", "0"), f"{here}.unit_amount", problems)
        flat_amount = _int(raw.get("flat_amount", 0), f"{here}.flat_amount", problems)
        tiers.append(
            Tier(up_to=up_to, unit_amount=unit_amount or Decimal(0), flat_amount=flat_amount or 0)
        )
    return tuple(tiers)


def _metered(name: str, raw: Any, path: str, problems: _Problems) -> MeteredPrice | None:
    if not _METRIC.match(name):
        problems.add(path, "metric name must match ^[a-z][a-z0-9_.-]{0,63}$")
    if not isinstance(raw, dict):
        problems.add(path, "must be an object")
        return None
    _unknown(
        raw,
        {
            "model",
            "included",
            "unit_amount",
            "package_size",
            "package_amount",
            "tiers",
            "aggregation",
            "stripe_meter",
        },
        path,
        problems,
    )
    before = len(problems.items)
    model = raw.get("model")
    if model not in MODELS:
        problems.add(f"{path}.model", f"must be one of {', '.join(MODELS)}")
    included = _decimal_string(raw.get("included", 0), f"{path}.included", problems)
    aggregation = raw.get("aggregation", "sum")
    if aggregation not in AGGREGATIONS:
        problems.add(f"{path}.aggregation", "must be sum or max")
    meter = raw.get("stripe_meter")
    if meter is not None and (not isinstance(meter, str) or not 0 < len(meter) <= 100):
        problems.add(f"{path}.stripe_meter", "must be a meter event name (1-100 characters)")
    unit_amount = Decimal(0)
    package_size, package_amount = 1, 0
    tiers: tuple[Tier, ...] = ()
    if model == "per_unit":
        if "unit_amount" not in raw:
            problems.add(f"{path}.unit_amount", "is required for per_unit")
        unit_amount = _decimal_string(
            raw.get("unit_amount", "0"), f"{path}.unit_amount", problems
        ) or Decimal(0)
    elif model == "package":
        for name_ in ("package_size", "package_amount"):
            if name_ not in raw:
                problems.add(f"{path}.{name_}", "is required for package")
        package_size = (
            _int(raw.get("package_size", 1), f"{path}.package_size", problems, minimum=1) or 1
        )
        package_amount = _int(raw.get("package_amount", 0), f"{path}.package_amount", problems) or 0
    elif model in ("graduated", "volume"):
        tiers = _tiers(raw.get("tiers"), f"{path}.tiers", problems)
    if len(problems.items) > before:
        return None
    return MeteredPrice(
        model=cast(PriceModel, model),
        included=included or Decimal(0),
        unit_amount=unit_amount,
        package_size=package_size,
        package_amount=package_amount,
        tiers=tiers,
        aggregation=cast(Aggregation, aggregation),
        stripe_meter=meter,
    )


def _validate_features(features: Any, path: str, problems: _Problems) -> dict[str, MeteredPrice]:
    if not isinstance(features, dict):
        problems.add(path, "must be an object")
        return {}
    _unknown(features, {"flags", "limits", "metered"}, path, problems)
    flags = features.get("flags", {})
    if not isinstance(flags, dict):
        problems.add(f"{path}.flags", "must be an object of name -> true/false")
    else:
        for name, value in flags.items():
            if not isinstance(value, bool):
                problems.add(f"{path}.flags.{name}", "must be true or false")
    limits = features.get("limits", {})
    if not isinstance(limits, dict):
        problems.add(f"{path}.limits", "must be an object of name -> integer")
    else:
        for name, value in limits.items():
            if value is not None:
                _int(value, f"{path}.limits.{name}", problems)
    metered = features.get("metered", {})
    if not isinstance(metered, dict):
        problems.add(f"{path}.metered", "must be an object of metric -> price")
        return {}
    prices = {}
    for name, raw in metered.items():
        if isinstance(raw, dict) and "filters" in raw:
            prices.update(_filtered(name, raw, f"{path}.metered.{name}", problems))
            continue
        price = _metered(name, raw, f"{path}.metered.{name}", problems)
        if price is not None:
            prices[name] = price
    return prices


_LABEL_TEXT = re.compile(r"^[^,=\[\]\x00]{1,256}$")


def _filtered(
    name: str, raw: dict[str, Any], path: str, problems: _Problems
) -> dict[str, MeteredPrice]:
    """A metered price per dimension filter: `filters` is a list of prices, each with `match`
    (dimension -> value), and the price itself is the default for values no filter matches.
    Each becomes a price of its own, named by filter_label. The quantity is the metric's meter's
    aggregation, so neither `aggregation` nor `stripe_meter` (a per-metric report) applies."""
    for key in ("aggregation", "stripe_meter"):
        if key in raw:
            problems.add(f"{path}.{key}", "does not apply to a price with filters")
    default = _metered(name, {k: v for k, v in raw.items() if k != "filters"}, path, problems)
    filters = raw["filters"]
    if not isinstance(filters, list) or not filters:
        problems.add(f"{path}.filters", "must be a non-empty list of prices, each with match")
        return {}
    matches: list[Match] = []
    prices: list[tuple[Match, MeteredPrice]] = []
    for index, item in enumerate(filters):
        here = f"{path}.filters[{index}]"
        if not isinstance(item, dict):
            problems.add(here, "must be an object with match and a price")
            continue
        for key in ("aggregation", "stripe_meter", "filters"):
            if key in item:
                problems.add(f"{here}.{key}", "does not apply to a filter")
        match = _match(item.get("match"), f"{here}.match", problems)
        if match is not None and match in matches:
            problems.add(f"{here}.match", f"is also filters[{matches.index(match)}]'s")
        price = _metered(name, {k: v for k, v in item.items() if k != "match"}, here, problems)
        if match is not None:
            matches.append(match)
            if price is not None:
                prices.append((match, price))
    if default is None or len(prices) != len(filters):
        return {}
    every = tuple(matches)
    found = {
        filter_label(name, match): replace(price, priced_filter=PricedFilter(name, match, every))
        for match, price in prices
    }
    found[filter_label(name, None)] = replace(
        default, priced_filter=PricedFilter(name, None, every)
    )
    return found


def _match(value: Any, path: str, problems: _Problems) -> Match | None:
    if not isinstance(value, dict) or not value:
        problems.add(path, "must be an object of dimension -> value, with at least one")
        return None
    if not all(
        isinstance(k, str) and isinstance(v, str) and _LABEL_TEXT.match(k) and _LABEL_TEXT.match(v)
        for k, v in value.items()
    ):
        problems.add(path, "dimension names and values are strings without , = [ or ]")
        return None
    return tuple(sorted(value.items()))


def validate_features(features: Any, path: str = "features") -> dict[str, MeteredPrice]:
    """The metered prices of a valid features document; InvalidInput listing every bad field."""
    problems = _Problems()
    prices = _validate_features(features, path, problems)
    if problems.items:
        raise InvalidInput("; ".join(problems.items), details=problems.items)
    return prices


def plan_price(features: dict[str, Any], flat_amount: int) -> PlanPrice:
    """The pricing view of a stored plan (features were validated when the plan was applied)."""
    return PlanPrice(flat_amount=flat_amount, metered=validate_features(features))


def pricing_snapshot(plan_id: Any, flat_amount: int, features: dict[str, Any]) -> dict[str, Any]:
    """What an invoice stores of the pricing it was priced with (`invoices.plan_snapshot`)."""
    return {
        "plan_id": str(plan_id),
        "flat_amount": flat_amount,
        "metered": features.get("metered") or {},
    }


@functools.lru_cache(maxsize=1024)
def _snapshot_price(text: str) -> PlanPrice:
    snapshot = json.loads(text)
    return plan_price({"metered": snapshot["metered"]}, snapshot["flat_amount"])


def snapshot_price(snapshot: dict[str, Any]) -> PlanPrice:
    """The pricing view of an invoice's plan snapshot (parsed once per distinct snapshot)."""
    return _snapshot_price(json.dumps(snapshot, sort_keys=True))


def validate_plan_file(document: Any) -> list[dict[str, Any]]:
    """The plans of a file (`{"plans": [...]}` or a bare list), validated; InvalidInput if not."""
    problems = _Problems()
    raw_plans = document.get("plans") if isinstance(document, dict) else document
    if not isinstance(raw_plans, list):
        raise InvalidInput("plans: must be a list of plans (or an object with a `plans` list)")
    seen: set[str] = set()
    plans: list[dict[str, Any]] = []
    for index, raw in enumerate(raw_plans):
        path = f"plans[{index}]"
        if not isinstance(raw, dict):
            problems.add(path, "must be an object")
            continue
        _unknown(raw, {"key", *PLAN_FIELDS}, path, problems)
        key = raw.get("key")
        if not isinstance(key, str) or not _KEY.match(key):
            problems.add(f"{path}.key", "is required: lowercase letters, digits, '.', '_' or '-'")
        elif key in seen:
            problems.add(f"{path}.key", f"duplicates an earlier plan {key!r}")
        else:
            seen.add(key)
        name = raw.get("name", key)
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            problems.add(f"{path}.name", "must be a string of 1-200 characters")
        currency = raw.get("currency", "usd")
        if not isinstance(currency, str) or not _CURRENCY.match(currency):
            problems.add(f"{path}.currency", "must be a lowercase ISO currency code such as usd")
        for money in ("price_monthly", "price_yearly"):
            _int(raw.get(money, 0), f"{path}.{money}", problems)
        if not isinstance(raw.get("active", True), bool):
            problems.add(f"{path}.active", "must be true or false")
        _validate_features(raw.get("features", {}), f"{path}.features", problems)
        plans.append(
            {
                "key": key,
                "name": name,
                "description": raw.get("description"),
                "price_monthly": raw.get("price_monthly", 0),
                "price_yearly": raw.get("price_yearly", 0),
                "currency": currency,
                "stripe_price_id_monthly": raw.get("stripe_price_id_monthly"),
                "stripe_price_id_yearly": raw.get("stripe_price_id_yearly"),
                "features": raw.get("features", {}),
                "active": raw.get("active", True),
            }
        )
    if problems.items:
        raise InvalidInput("; ".join(problems.items), details=problems.items)
    return plans
