"""Where an event's quantity is inside a drop-in payload: the value path of its metric.

OpenMeter meters name a JSON path into the CloudEvent's `data` (`valueProperty`), Lago billable
metrics a property (`field_name`). A Meterline meter's `value_property` is that path for its
metric (services/ingest/metercache.py wires the lookup); a metric without one keeps the defaults:
OpenMeter's `data.value`, Lago's count of 1 per event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: metric -> the JSON path of its quantity in the payload ("$.tokens", or "tokens"), or None
#: when its meter names none.
ValuePaths = Callable[[str], "str | None"]

MISSING = object()


def no_value_paths(metric: str) -> str | None:
    """A lookup in which no metric has a value path (the defaults hold)."""
    return None


def path_parts(path: str) -> list[str]:
    """`$.a.b`, `a.b` or `$` -> the keys to follow ([] for the payload itself)."""
    text = path.strip()
    if text.startswith("$"):
        text = text[1:].lstrip(".")
    return [part for part in text.split(".") if part] if text else []


def value_at(payload: Any, path: str) -> Any:
    """The value `path` names inside `payload`, or MISSING."""
    value = payload
    for part in path_parts(path):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def display(path: str, root: str) -> str:
    """How an error names the path: `data.value`, `properties.tokens`."""
    return ".".join([root, *path_parts(path)])
