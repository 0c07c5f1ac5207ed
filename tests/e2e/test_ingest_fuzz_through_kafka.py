"""Property-based fuzzing of the whole path: the real ingest service (its Kafka publisher), the real
broker and the real aggregator into PostgreSQL. Whatever the input: no 5xx; everything answered
202 is counted exactly once (the first accepted version of each id); nothing refused is counted.

The examples are posted as they come and the counts are compared once at the end (one wait for
the aggregator, not one per example).
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from tests.aggregator_support import AggregatorProcess, wait_for
from tests.ingest_support import Tenant, bearer, make_tenant, rfc3339, run_ingest

NOW = datetime.now(UTC)
# Text PostgreSQL cannot store, spelled as JSON escapes by json.dumps (ensure_ascii).
UNSTORABLE = ["a\x00b", "\x00", "\ud800", "x\udfff"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from(["NaN", "1e999", "-1", "api_calls", *UNSTORABLE]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
# Fresh ids, and a small pool that requests share (retries, resends with other content).
ids = st.uuids().map(str) | st.sampled_from([f"e{i}" for i in range(20)])
quantities = st.integers(min_value=0, max_value=10**12) | st.decimals(
    min_value=0, max_value=10**6, places=3, allow_nan=False
).map(str)
timestamps = st.integers(min_value=-2 * 86400, max_value=240).map(
    lambda offset: rfc3339(NOW + timedelta(seconds=offset))
)
# What may replace one field of a valid event: each is refused, or (spaces, a float, an empty
# object) accepted with a value the model below reads independently.
bad_values = {
    "id": st.sampled_from(UNSTORABLE) | st.just("") | st.text(min_size=129, max_size=130),
    "metric": st.sampled_from(["API", "m\x00", "1x", "a" * 65]) | json_values,
    "quantity": st.sampled_from(["1e13", "-1", " 2 ", "0.0000000000001", "NaN", True])
    | json_values,
    "timestamp": st.sampled_from(["yesterday", "2026-11-24T10:00:00"])
    | st.just(rfc3339(NOW + timedelta(hours=1)))
    | st.just(rfc3339(NOW - timedelta(days=40))),
    "project_id": st.sampled_from([str(uuid.uuid4()), "nope", UNSTORABLE[0]]),
    "properties": st.dictionaries(
        st.sampled_from(UNSTORABLE) | st.text(max_size=70), st.text(max_size=4), max_size=2
    )
    | json_values,
    "extra": json_values,
}


@st.composite
def raw_events(draw: st.DrawFn, projects: list[str]) -> object:
    """Mostly valid events; one in five has one field replaced by something odd."""
    event: dict[str, object] = {
        "id": draw(ids),
        "metric": draw(st.sampled_from(["api_calls", "storage_gb"])),
    }
    if draw(st.booleans()):
        event["quantity"] = draw(quantities)
    if draw(st.integers(0, 3)) == 0:
        event["timestamp"] = draw(timestamps)
    if draw(st.integers(0, 3)) == 0:
        event["project_id"] = draw(st.sampled_from(projects))
    if draw(st.integers(0, 3)) == 0:
        event["properties"] = draw(
            st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3)
        )
    if draw(st.integers(0, 4)) == 0:
        name = draw(st.sampled_from(sorted(bad_values)))
        event[name] = draw(bad_values[name])
    if draw(st.integers(0, 29)) == 0:
        return draw(json_values)
    return event


@st.composite
def requests(draw: st.DrawFn, projects: list[str]) -> tuple[bytes, bool]:
    """A body (one event, a batch, or garbage) and whether the project-scoped key sends it."""
    shape = draw(st.integers(0, 9))
    if shape == 0:
        body = draw(st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
    elif shape <= 3:
        body = json.dumps(draw(raw_events(projects))).encode()
    else:
        batch = draw(st.lists(raw_events(projects), min_size=1, max_size=4))
        body = json.dumps({"events": batch}).encode()
    return body, draw(st.booleans())


def quantity_of(value: object) -> Decimal:
    """What a 202 means this event counts, read independently of ingest's code."""
    if isinstance(value, str):
        return Decimal(value.strip())
    if isinstance(value, float):
        return Decimal(repr(value))
    return Decimal(value)  # type: ignore[arg-type]


@dataclass
class Expected:
    """The first accepted version of each event id, by metric."""

    first: dict[str, tuple[str, Decimal]] = field(default_factory=dict)
    answered: dict[int, int] = field(default_factory=dict)

    def accepted(self, body: bytes) -> None:
        decoded = json.loads(body)
        for item in decoded.get("events", [decoded]):
            quantity = quantity_of(item["quantity"]) if "quantity" in item else Decimal(1)
            self.first.setdefault(item["id"], (item["metric"], quantity))

    def totals(self) -> dict[str, tuple[Decimal, int]]:
        by_metric: dict[str, tuple[Decimal, int]] = {}
        for metric, quantity in self.first.values():
            total, count = by_metric.get(metric, (Decimal(0), 0))
            by_metric[metric] = (total + quantity, count + 1)
        return by_metric


def counted(engine: Engine, organization_id: uuid.UUID) -> dict[str, tuple[Decimal, int]]:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT metric, sum(quantity), sum(event_count) FROM usage_records"
                " WHERE organization_id = :org GROUP BY metric"
            ),
            {"org": organization_id},
        )
        return {row[0]: (Decimal(row[1]).normalize(), int(row[2])) for row in rows}


@pytest.fixture
def pipeline(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> Iterator[tuple[httpx.Client, Tenant, list[str]]]:
    env = {
        **service_env,
        "METERLINE_TOPIC_PREFIX": topic_prefix,
        "METERLINE_INGEST_RATE_LIMIT_PER_SECOND": "100000",
        "METERLINE_INGEST_RATE_LIMIT_BURST": "100000",
    }
    tenant = make_tenant(engine)
    with run_ingest(env, tmp_path / "ingest.log") as server:
        aggregator = AggregatorProcess(env, tmp_path / "aggregator.log").start()
        try:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                yield client, tenant, [str(tenant.project_id)]
        finally:
            aggregator.stop()


def test_whatever_is_posted_202_counts_once_and_the_refused_count_nothing(
    pipeline: tuple[httpx.Client, Tenant, list[str]], engine: Engine
) -> None:
    client, tenant, projects = pipeline
    expected = Expected()
    run = secrets.token_hex(3)

    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )
    @given(st.lists(requests(projects), min_size=1, max_size=3))
    def post_requests(batch: list[tuple[bytes, bool]]) -> None:
        for body, scoped in batch:
            response = client.post(
                "/v1/events",
                content=body,
                headers={
                    **bearer(tenant.scoped_key if scoped else tenant.key),
                    "Content-Type": "application/json",
                    "X-Fuzz-Run": run,
                },
            )
            assert response.status_code < 500, response.text
            assert response.status_code in {202, 403, 422}, response.text
            expected.answered[response.status_code] = (
                expected.answered.get(response.status_code, 0) + 1
            )
            if response.status_code == 202:
                expected.accepted(body)

    post_requests()

    want = {metric: (total.normalize(), n) for metric, (total, n) in expected.totals().items()}
    assert expected.answered.get(202), expected.answered  # acceptance was exercised too
    wait_for(
        lambda: counted(engine, tenant.organization_id) == want,
        timeout=90,
        what=f"usage_records to hold exactly {want} (answers: {expected.answered})",
    )
    with engine.connect() as connection:
        ledger = connection.execute(
            sa.text("SELECT count(*) FROM usage_event_ledger WHERE organization_id = :org"),
            {"org": tenant.organization_id},
        ).scalar_one()
    assert ledger == len(expected.first)
