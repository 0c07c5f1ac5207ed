"""What both translations share: turning a payload's values into Meterline property text, and
naming fields in error reasons as the client's wire shape calls them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import msgspec

from shared.errors import InvalidInput, MeterlineError

#: Meterline events as the translations hand them to the /v1/events path: numbers stay exact.
event_encoder = msgspec.json.Encoder(decimal_format="number")


def property_text(value: Any) -> str | None:
    """A payload value as a property (string -> string): text as it is, numbers and booleans
    as JSON writes them, objects and lists as compact JSON; None (null) leaves it out."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal | int):
        return str(value)
    return event_encoder.encode(value).decode()


def translate_all(
    items: list[Any], one: Callable[[Any], dict[str, Any] | str], noun: str
) -> list[dict[str, Any]]:
    """Meterline events, one per item in order (`one` gives an event, or the reason it is none),
    or InvalidInput naming each item that is not one: all or nothing, as /v1/events is."""
    events, problems = [], []
    for index, item in enumerate(items):
        result = one(item)
        if isinstance(result, str):
            problems.append({"index": index, "reason": result})
        else:
            events.append(result)
    if problems:
        raise InvalidInput(
            f"{len(problems)} of {len(items)} {noun} are invalid; nothing was accepted",
            details=problems,
        )
    return events


def text_properties(values: Mapping[str, Any], *, leave_out: str | None = None) -> dict[str, str]:
    found = {}
    for name, value in values.items():
        if name == leave_out:
            continue
        text = property_text(value)
        if text is not None:
            found[str(name)] = text
    return found


def renamed(exc: MeterlineError, names: Mapping[str, str]) -> MeterlineError:
    """`exc` with each reason's leading Meterline field name (`metric: ...`) replaced by the
    client's (`type: ...`), so a client reads errors in its own terms."""
    if not isinstance(exc.details, list):
        return exc
    details: list[Any] = []
    for detail in exc.details:
        if isinstance(detail, dict) and isinstance(detail.get("reason"), str):
            reasons = [_rename(reason, names) for reason in detail["reason"].split("; ")]
            details.append({**detail, "reason": "; ".join(reasons)})
        elif isinstance(detail, str):
            details.append(_rename(detail, names))
        else:
            details.append(detail)
    exc.details = details
    return exc


def _rename(reason: str, names: Mapping[str, str]) -> str:
    field, colon, rest = reason.partition(":")
    head, dot, tail = field.partition(".")
    if colon and head in names:
        return f"{names[head]}{dot}{tail}{colon}{rest}"
    return reason
