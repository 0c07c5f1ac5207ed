"""Schemathesis hooks for the contract test (SCHEMATHESIS_HOOKS=tests.contract_hooks).

They teach the generator only the rules that the OpenAPI document states in words and in its
`x-meterline-*` extensions, because JSON Schema cannot: a timestamp lies in a window around the
time the request arrives, and a usage range has `from` before `to` and spans at most N days. Both
are read from the committed document. Only schema-valid (positive) cases get their date-times
moved into the window, keeping how they were written (zone, fraction digits, letter case).

And one fact no schema can know: which projects exist. Most well-formed project ids, in every
case, become the key's own project (METERLINE_CONTRACT_PROJECT_ID), so that a request reaches
every rule instead of stopping at 403; the rest stay foreign and get their 403.

Nor which dimensions the meters keep: a usage query naming a dimension no meter keeps is refused
with 422 (the document says so in words). Schema-valid usage queries name the contract meter's
dimensions instead (METERLINE_CONTRACT_METER: its metric and dimensions), each at most once,
and ask for its metric when they ask for a metric at all.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import schemathesis

DOCUMENT = json.loads(
    (Path(__file__).resolve().parents[1] / "services" / "ingest" / "openapi.json").read_text()
)
EVENT = DOCUMENT["components"]["schemas"]["Event"]["properties"]
WINDOW = EVENT["timestamp"]["x-meterline-window"]
RANGE = DOCUMENT["paths"]["/v1/usage"]["get"]["x-meterline-range"]
STYLE = re.compile(
    r"^.{10}(?P<t>[Tt]).{8}(?:\.(?P<fraction>[0-9]+))?(?P<zone>[Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
# Margins keep a moved instant inside the window while the request travels and the run goes on.
OLDEST = timedelta(days=WINDOW["max_age_days"]) - timedelta(hours=1)
NEWEST = timedelta(seconds=WINDOW["max_future_seconds"]) - timedelta(seconds=90)
LONGEST = timedelta(days=RANGE["max_days"]) - timedelta(hours=1)
OWN_PROJECT = os.environ.get("METERLINE_CONTRACT_PROJECT_ID")
UUID = re.compile(EVENT["project_id"]["pattern"])
METER = json.loads(os.environ.get("METERLINE_CONTRACT_METER", "null"))
GROUPS_OF_THEIR_OWN = ("project", "api_key", "metric")


def _pick(text: str, low: timedelta, high: timedelta) -> timedelta:
    """A span in [low, high] chosen by the text itself, so a case keeps its values on replay."""
    seconds = (high - low).total_seconds()
    return low + timedelta(seconds=zlib.crc32(text.encode()) % max(1, int(seconds)))


def _written_like(text: str, instant: datetime) -> str:
    """`instant` written in the style of `text` (an RFC 3339 date-time the schema accepts)."""
    style = STYLE.match(text)
    if style is None:
        return text
    zone = style["zone"]
    offset = timedelta(0)
    if zone not in ("Z", "z"):
        sign = -1 if zone[0] == "-" else 1
        offset = sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    local = instant.astimezone(timezone(offset))
    written = local.strftime(f"%Y-%m-%d{style['t']}%H:%M:%S")
    if style["fraction"]:
        written += "." + f"{local.microsecond:06d}000"[: len(style["fraction"])]
    return written + zone


def _moved(value: Any, low: timedelta, high: timedelta, now: datetime) -> Any:
    if not isinstance(value, str):
        return value
    return _written_like(value, now + _pick(value, low, high))


def _events(body: Any) -> list[dict[str, Any]]:
    items = body.get("events") if isinstance(body, dict) and "events" in body else [body]
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def _events_in_window(body: Any) -> Any:
    now = datetime.now(UTC)
    for item in _events(body):
        if "timestamp" in item:
            item["timestamp"] = _moved(item["timestamp"], -OLDEST, NEWEST, now)
    return body


def _own_projects(body: Any) -> Any:
    for item in _events(body):
        project = item.get("project_id")
        well_formed = isinstance(project, str) and UUID.match(project)
        # One in four stays foreign (deterministically, so a replayed case is the same case).
        keep_foreign = zlib.crc32(json.dumps(item, sort_keys=True, default=str).encode()) % 4 == 0
        if OWN_PROJECT and well_formed and not keep_foreign:
            item["project_id"] = OWN_PROJECT
    return body


def _range_in_limits(query: dict[str, Any]) -> dict[str, Any]:
    now = datetime.now(UTC)
    start, end = query.get("from"), query.get("to")
    if isinstance(start, str) and isinstance(end, str):
        begin = now - _pick(start, timedelta(minutes=1), LONGEST)
        query["from"] = _written_like(start, begin)
        query["to"] = _written_like(end, begin + _pick(end, timedelta(seconds=1), LONGEST))
    elif isinstance(start, str):
        query["from"] = _moved(start, -LONGEST, -timedelta(minutes=1), now)
    elif isinstance(end, str):
        query["to"] = _moved(end, -LONGEST, LONGEST, now)
    return query


def _known_dimensions(query: dict[str, Any]) -> dict[str, Any]:
    if METER is None:
        return query
    free = list(METER["dimensions"])
    asked = False
    groups = query.get("group_by")
    if isinstance(groups, str | list):
        kept = []
        for name in [groups] if isinstance(groups, str) else groups:
            if name in GROUPS_OF_THEIR_OWN:
                kept.append(name)
            elif free:
                kept.append(free.pop(0))
                asked = True
        query["group_by"] = kept
    filters = query.get("filter")
    if isinstance(filters, dict):
        mapped = {}
        for value in filters.values():
            if free:
                mapped[free.pop(0)] = value
                asked = True
        query["filter"] = mapped
    if asked and "metric" in query:
        query["metric"] = METER["metric"]
    return query


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    meta = case.meta
    if case.operation.path == "/v1/events":
        case.body = _own_projects(case.body)
    if meta is None or not meta.generation.mode.is_positive:
        return case
    if case.operation.path == "/v1/events":
        case.body = _events_in_window(case.body)
    elif case.operation.path == "/v1/usage" and isinstance(case.query, dict):
        case.query = _known_dimensions(_range_in_limits(case.query))
    return case
