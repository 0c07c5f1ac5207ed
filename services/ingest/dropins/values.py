"""Where an event's quantity is inside a drop-in payload: the value path of its metric.

OpenMeter meters name a JSON path into the CloudEvent's `data` (`valueProperty`), Lago billable
metrics a property (`field_name`). Meterline has no meter definitions yet, so every metric has no
path of its own and the defaults hold: OpenMeter's `data.value`, Lago's count of 1 per event.
`ValuePaths` is the one seam: when meters define a `value_property`, ingest wires a lookup of it
here and both translations follow it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: metric -> the JSON path of its quantity in the payload ("$.tokens", or "tokens"), or None
#: when its meter names none.
ValuePaths = Callable[[str], "str | None"]

MISSING = object()


def no_value_paths(metric: str) -> str | None:
    """The lookup until meters name value paths: no metric has one."""
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
