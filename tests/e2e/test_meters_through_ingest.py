"""Meters through the real `ingest serve` and `aggregate run`: every aggregation, grouped and
filtered by dimensions, over hours, days and a month, equals what the raw posted events give
(with duplicates, conflicting resends and late events); replay restores corrupted dimension
rows exactly and a second replay changes nothing.

The oracle (`Oracle`) computes from the posted events alone: which version of an id counts
(the first accepted), which bucket each falls in, and each aggregation by its definition."""

from __future__ import annotations

import json
import random
import secrets
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared.db import unit_of_work
from shared.models import BillingInterval, Plan
from shared.subscriptions import create_subscription
from tests.aggregator_support import AggregatorProcess, create_topics, wait_for
from tests.ingest_support import Tenant, bearer, make_tenant, rfc3339, run_ingest

METERLINE = str(Path(sys.executable).parent / "meterline")
MODELS = ("small", "large")
TYPES = ("input", "output")
REGIONS = ("eu", "us", "ap")


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [METERLINE, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


@dataclass(frozen=True)
class Posted:
    id: str
    metric: str
    quantity: Decimal
    timestamp: datetime
    properties: dict[str, str]


def truncate(moment: datetime, granularity: str) -> datetime:
    moment = moment.astimezone(UTC)
    if granularity == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    if granularity == "day":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


class Oracle:
    """Usage by definition, from the events the test posted and saw answered 202."""

    def __init__(self, meters: dict[str, dict[str, Any]]) -> None:
        self.meters = meters
        self.counted: dict[str, Posted] = {}  # first accepted version of each id wins

    def accept(self, events: list[Posted]) -> None:
        for e in events:
            self.counted.setdefault(e.id, e)

    def usage(
        self,
        metric: str,
        *,
        start: datetime,
        end: datetime,
        granularity: str,
        group_by: tuple[str, ...] = (),
        filters: dict[str, str] | None = None,
    ) -> dict[tuple[Any, ...], tuple[Decimal, int]]:
        meter = self.meters[metric]
        groups: dict[tuple[Any, ...], list[Posted]] = defaultdict(list)
        for e in self.counted.values():
            if e.metric != metric or not start <= e.timestamp < end:
                continue
            if any(e.properties.get(k) != v for k, v in (filters or {}).items()):
                continue
            key = (truncate(e.timestamp, granularity), *(e.properties.get(g) for g in group_by))
            groups[key].append(e)
        return {key: (self._aggregate(meter, evs), len(evs)) for key, evs in groups.items()}

    @staticmethod
    def _aggregate(meter: dict[str, Any], events: list[Posted]) -> Decimal:
        aggregation = meter["aggregation"]
        quantities = [e.quantity for e in events]
        if aggregation == "sum":
            return sum(quantities, Decimal(0))
        if aggregation == "count":
            return Decimal(len(events))
        if aggregation == "max":
            return max(quantities)
        if aggregation == "min":
            return min(quantities)
        if aggregation == "latest":
            # The stated rule: the latest timestamp, ties to the greater event id.
            return max(events, key=lambda e: (e.timestamp, e.id)).quantity
        return Decimal(len({e.properties[meter["property"]] for e in events}))


@dataclass
class Scene:
    env: dict[str, str]
    engine: Engine
    tenant: Tenant
    oracle: Oracle
    metrics: dict[str, str]  # aggregation -> metric name
    start: datetime
    end: datetime
    url: str
    tmp: Path


def meter_file(suffix: str) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    metrics = {
        "sum": f"tokens_{suffix}",
        "count": f"calls_{suffix}",
        "max": f"seats_{suffix}",
        "min": f"floor_{suffix}",
        "latest": f"storage_{suffix}",
        "unique_count": f"active_users_{suffix}",
    }
    gpu = f"gpu_seconds_{suffix}"  # posted through the OpenMeter route: its value path is read
    meters = {
        metrics["sum"]: {"aggregation": "sum", "dimensions": ["model", "type", "region"]},
        metrics["count"]: {"aggregation": "count", "dimensions": ["region"]},
        metrics["max"]: {"aggregation": "max", "dimensions": ["region"]},
        metrics["min"]: {"aggregation": "min", "dimensions": ["region"]},
        metrics["latest"]: {"aggregation": "latest", "dimensions": ["region"]},
        metrics["unique_count"]: {
            "aggregation": "unique_count",
            "property": "user_id",
            "dimensions": ["region"],
        },
        gpu: {"aggregation": "sum", "dimensions": ["region"], "value_property": "$.seconds"},
    }
    return metrics, meters


def make_events(metrics: dict[str, str], start: datetime, now: datetime, seed: int) -> list[Posted]:
    rng = random.Random(seed)
    span = int((now - start).total_seconds()) - 60
    events = []
    for i in range(900):
        aggregation = rng.choice(list(metrics))
        metric = metrics[aggregation]
        at = start + timedelta(seconds=rng.randrange(span))
        properties = {"region": rng.choice(REGIONS)}
        if aggregation == "sum":
            properties |= {"model": rng.choice(MODELS), "type": rng.choice(TYPES)}
        if aggregation == "unique_count":
            properties["user_id"] = f"u{rng.randrange(40)}"
        quantity = Decimal(rng.randrange(0, 5000)) / 100
        events.append(Posted(f"e{seed}-{i}", metric, quantity, at, properties))
    # Ties for `latest`: the same instant, the greater id must win.
    tie = start + timedelta(days=3, minutes=7)
    for suffix, quantity in (("a", "7"), ("b", "3")):
        events.append(
            Posted(f"tie-{suffix}", metrics["latest"], Decimal(quantity), tie, {"region": "eu"})
        )
    rng.shuffle(events)  # late events: timestamps out of order, windows days apart
    return events


def wire(e: Posted) -> dict[str, Any]:
    return {
        "id": e.id,
        "metric": e.metric,
        "quantity": str(e.quantity),
        "timestamp": rfc3339(e.timestamp),
        "properties": e.properties,
    }


@pytest.fixture(scope="module")
def scene(
    engine: Engine, service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scene]:
    tmp = tmp_path_factory.mktemp("meters")
    prefix = f"m{secrets.token_hex(4)}"
    env = {**service_env, "METERLINE_TOPIC_PREFIX": prefix}
    create_topics(
        env["KAFKA_BOOTSTRAP_SERVERS"],
        [f"{prefix}.usage.events", f"{prefix}.usage.events.dlq"],
        partitions=2,
    )
    metrics, meters = meter_file(secrets.token_hex(3))
    path = tmp / "meters.yaml"
    path.write_text(json.dumps({"meters": [{"metric": m, **d} for m, d in meters.items()]}))
    applied = run_cli(env, "meters", "apply", str(path), "--json")
    assert applied.returncode == 0, applied.stderr
    tenant = make_tenant(engine)
    now = datetime.now(UTC)
    start = truncate(now - timedelta(days=30), "day")
    end = truncate(now, "hour") + timedelta(hours=1)
    oracle = Oracle(meters)
    events = make_events(metrics, start, now, seed=11)
    with run_ingest(env, tmp / "ingest.log") as server:
        aggregator = AggregatorProcess(env, tmp / "aggregator.log").start()
        try:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for i in range(0, len(events), 50):
                    batch = events[i : i + 50]
                    for _attempt in range(2 if i % 150 == 0 else 1):  # client retries
                        response = client.post(
                            "/v1/events",
                            json={"events": [wire(e) for e in batch]},
                            headers=bearer(tenant.key),
                        )
                        assert response.status_code == 202, response.text
                    oracle.accept(batch)
                # Resends of counted ids with other content: conflicts, not counted.
                resent = [
                    Posted(e.id, e.metric, e.quantity + 1, e.timestamp, e.properties)
                    for e in events[:20]
                ]
                response = client.post(
                    "/v1/events",
                    json={"events": [wire(e) for e in resent]},
                    headers=bearer(tenant.key),
                )
                assert response.status_code == 202, response.text
                oracle.accept(resent)

            def all_counted() -> bool:
                with engine.connect() as connection:
                    counted = connection.execute(
                        sa.text(
                            "SELECT coalesce(sum(event_count), 0) FROM meter_windows"
                            " WHERE organization_id = :org"
                        ),
                        {"org": tenant.organization_id},
                    ).scalar_one()
                return int(counted) >= len(oracle.counted)

            wait_for(all_counted, timeout=120, what="every accepted metered event")
            yield Scene(env, engine, tenant, oracle, metrics, start, end, server.url, tmp)
        finally:
            aggregator.stop()


def fetch_usage(
    scene: Scene, metric: str, granularity: str, group_by: tuple[str, ...] = (), **filters: str
) -> dict[tuple[Any, ...], tuple[Decimal, int]]:
    params: list[tuple[str, str]] = [
        ("metric", metric),
        ("from", rfc3339(scene.start)),
        ("to", rfc3339(scene.end)),
        ("granularity", granularity),
    ]
    params += [("group_by", g) for g in group_by]
    params += [(f"filter[{k}]", v) for k, v in filters.items()]
    response = httpx.get(
        scene.url + "/v1/usage", params=params, headers=bearer(scene.tenant.key), timeout=30
    )
    assert response.status_code == 200, response.text
    found = {}
    for row in response.json()["data"]:
        dims = row.get("dimensions", {})
        key = (datetime.fromisoformat(row["start"]), *(dims.get(g) for g in group_by))
        found[key] = (Decimal(row["quantity"]), row["event_count"])
    return found


AGGREGATIONS = ("sum", "count", "max", "min", "latest", "unique_count")


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("granularity", ["hour", "day", "month"])
def test_each_aggregation_over_hours_days_and_a_month_equals_the_raw_events(
    scene: Scene, aggregation: str, granularity: str
) -> None:
    metric = scene.metrics[aggregation]
    expected = scene.oracle.usage(metric, start=scene.start, end=scene.end, granularity=granularity)
    assert fetch_usage(scene, metric, granularity) == expected


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_each_aggregation_grouped_by_a_dimension_per_day_equals_the_raw_events(
    scene: Scene, aggregation: str
) -> None:
    metric = scene.metrics[aggregation]
    expected = scene.oracle.usage(
        metric, start=scene.start, end=scene.end, granularity="day", group_by=("region",)
    )
    assert fetch_usage(scene, metric, "day", ("region",)) == expected


def test_tokens_grouped_by_model_and_type_filtered_by_region_equal_the_raw_events(
    scene: Scene,
) -> None:
    metric = scene.metrics["sum"]
    for region in REGIONS:
        expected = scene.oracle.usage(
            metric,
            start=scene.start,
            end=scene.end,
            granularity="month",
            group_by=("model", "type"),
            filters={"region": region},
        )
        assert expected
        assert fetch_usage(scene, metric, "month", ("model", "type"), region=region) == expected


def test_a_monthly_unique_count_is_distinct_users_not_a_sum_of_daily_counts(
    scene: Scene,
) -> None:
    metric = scene.metrics["unique_count"]
    daily = fetch_usage(scene, metric, "day")
    monthly = fetch_usage(scene, metric, "month")
    users = {
        e.properties["user_id"]
        for e in scene.oracle.counted.values()
        if e.metric == metric and scene.start <= e.timestamp < scene.end
    }
    assert sum(q for q, _ in monthly.values()) >= len(users)
    assert sum(q for q, _ in daily.values()) > sum(q for q, _ in monthly.values())


def test_latest_of_two_events_at_one_instant_is_the_greater_event_id(scene: Scene) -> None:
    metric = scene.metrics["latest"]
    tie = scene.oracle.counted["tie-a"].timestamp
    hourly = fetch_usage(scene, metric, "hour", ("region",), region="eu")
    later_in_hour = [
        e
        for e in scene.oracle.counted.values()
        if e.metric == metric
        and e.properties["region"] == "eu"
        and truncate(e.timestamp, "hour") == truncate(tie, "hour")
        and e.timestamp > tie
    ]
    if not later_in_hour:
        assert hourly[(truncate(tie, "hour"), "eu")][0] == Decimal(3)  # tie-b > tie-a


def test_an_event_lacking_its_meters_dimensions_is_refused_naming_them(scene: Scene) -> None:
    bad = {
        "events": [
            {"id": "ok-1", "metric": scene.metrics["count"], "properties": {"region": "eu"}},
            {"id": "bad-1", "metric": scene.metrics["sum"], "properties": {"model": "large"}},
        ]
    }
    response = httpx.post(
        scene.url + "/v1/events", json=bad, headers=bearer(scene.tenant.key), timeout=30
    )
    assert response.status_code == 422
    details = response.json()["error"]["details"]
    assert [d["index"] for d in details] == [1]
    assert "type" in details[0]["reason"] and "region" in details[0]["reason"]


def meter_rows(engine: Engine, organization_id: object) -> tuple[set[Any], set[Any]]:
    with engine.connect() as connection:
        windows = {
            tuple(row)
            for row in connection.execute(
                sa.text(
                    "SELECT metric, dimensions::text, window_start, quantity, event_count,"
                    " max_quantity, min_quantity, latest_quantity, latest_at, latest_event_id"
                    " FROM meter_windows WHERE organization_id = :org"
                ),
                {"org": organization_id},
            )
        }
        values = {
            tuple(row)
            for row in connection.execute(
                sa.text(
                    "SELECT metric, dimensions::text, window_start, value FROM meter_values"
                    " WHERE organization_id = :org"
                ),
                {"org": organization_id},
            )
        }
    return windows, values


def usage_version(engine: Engine, org: object) -> int | None:
    """The organization's usage version (what billing reads to skip unchanged usage)."""
    with engine.connect() as connection:
        found = connection.execute(
            sa.text("SELECT version FROM usage_versions WHERE organization_id = :org"),
            {"org": org},
        ).scalar()
    return None if found is None else int(found)


def test_replay_restores_corrupted_dimension_rows_and_a_second_replay_changes_nothing(
    scene: Scene,
) -> None:
    org = scene.tenant.organization_id
    before = meter_rows(scene.engine, org)
    with scene.engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE meter_windows SET quantity = quantity + 5, max_quantity = 0,"
                " latest_quantity = 99 WHERE organization_id = :org AND ctid IN"
                " (SELECT ctid FROM meter_windows WHERE organization_id = :org LIMIT 40)"
            ),
            {"org": org},
        )
        connection.execute(
            sa.text(
                "DELETE FROM meter_windows WHERE ctid IN (SELECT ctid FROM meter_windows"
                " WHERE organization_id = :org ORDER BY window_start DESC LIMIT 10)"
            ),
            {"org": org},
        )
        connection.execute(
            sa.text(
                "DELETE FROM meter_values WHERE ctid IN (SELECT ctid FROM meter_values"
                " WHERE organization_id = :org LIMIT 15)"
            ),
            {"org": org},
        )
        connection.execute(
            sa.text(
                "INSERT INTO meter_values (organization_id, metric, dimensions,"
                " window_start, window_seconds, value)"
                " SELECT organization_id, metric, dimensions, window_start,"
                " window_seconds, 'intruder' FROM meter_values WHERE organization_id = :org"
                " LIMIT 1"
            ),
            {"org": org},
        )
    assert meter_rows(scene.engine, org) != before
    version = usage_version(scene.engine, org)
    window = ("--from", rfc3339(scene.start), "--to", rfc3339(scene.end))
    first = run_cli(scene.env, "replay", *window, "--organization", str(org), "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["meter_windows_changed"] == 50
    assert report["meter_values_changed"] == 16
    assert meter_rows(scene.engine, org) == before
    # Repairing meter rows alone is a change of usage: billing re-prices the open periods.
    assert usage_version(scene.engine, org) != version
    second = run_cli(scene.env, "replay", *window, "--organization", str(org), "--json")
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)
    assert (again["meter_windows_changed"], again["meter_values_changed"]) == (0, 0)
    assert meter_rows(scene.engine, org) == before


def test_a_dimension_another_meter_keeps_groups_as_null_and_filters_to_nothing(
    scene: Scene,
) -> None:
    metric = scene.metrics["count"]  # its meter keeps region only; the sum meter keeps model
    expected = scene.oracle.usage(metric, start=scene.start, end=scene.end, granularity="month")
    base = {"from": rfc3339(scene.start), "to": rfc3339(scene.end), "granularity": "month"}

    def rows(params: dict[str, str]) -> list[dict[str, Any]]:
        response = httpx.get(
            scene.url + "/v1/usage", params={**base, **params},
            headers=bearer(scene.tenant.key), timeout=30,
        )  # fmt: skip
        assert response.status_code == 200, response.text
        return [row for row in response.json()["data"] if row["metric"] == metric]

    # Over every metric, a dimension some meter keeps is null for the metrics that lack it...
    grouped = {
        (datetime.fromisoformat(r["start"]), r["dimensions"]["model"]): (
            Decimal(r["quantity"]), r["event_count"],
        )
        for r in rows({"group_by": "model"})
    }  # fmt: skip
    assert grouped == {(start, None): total for (start,), total in expected.items()}
    # ...and a filter on it matches none of their events.
    assert rows({"filter[model]": "large"}) == []
    # Asked of this metric alone, the dimension is no dimension of its meter: refused by name.
    for params in ({"group_by": "model"}, {"filter[model]": "large"}):
        response = httpx.get(
            scene.url + "/v1/usage", params={**base, **params, "metric": metric},
            headers=bearer(scene.tenant.key), timeout=30,
        )  # fmt: skip
        assert response.status_code == 422, response.text
        assert f"'model' is no dimension of the meter of {metric!r}" in response.text


# --- Prices per dimension filter -----------------------------------------------------------------


def half_up(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def oracle_amount(quantity: Decimal, price: dict[str, Any]) -> int:
    """One line's amount from the README's pricing rules, worked out without Meterline."""
    billable = max(Decimal(0), quantity - Decimal(str(price.get("included", 0))))
    if billable == 0:
        return 0
    model = price["model"]
    if model == "per_unit":
        return half_up(billable * Decimal(price["unit_amount"]))
    if model == "package":
        size = Decimal(price["package_size"])
        packages = billable // size + (1 if billable % size else 0)  # whole packages, rounded up
        return half_up(packages * price["package_amount"])
    tiers = price["tiers"]
    if model == "volume":
        for tier in tiers:
            if tier["up_to"] is None or billable <= tier["up_to"]:
                return half_up(billable * Decimal(tier["unit_amount"]) + tier.get("flat_amount", 0))
    amount, below = Decimal(0), Decimal(0)
    for tier in tiers:
        top = Decimal(tier["up_to"]) if tier["up_to"] is not None else billable
        if billable > below:
            amount += (min(billable, top) - below) * Decimal(tier["unit_amount"])
            amount += tier.get("flat_amount", 0)
        below = top
    return half_up(amount)


def filtered_plan(metrics: dict[str, str]) -> dict[str, Any]:
    by_region = {
        "model": "per_unit",
        "unit_amount": "3",
        "filters": [
            {"match": {"region": "eu"}, "model": "per_unit", "unit_amount": "7", "included": 2},
            {"match": {"region": "us"}, "model": "package", "package_size": 3,
             "package_amount": 40},
        ],
    }  # fmt: skip
    metered: dict[str, Any] = {metrics[a]: by_region for a in ("count", "max", "latest")}
    # No filters: priced by its meter's aggregation (min), not usage_records' sum.
    metered[metrics["min"]] = {"model": "per_unit", "unit_amount": "11"}
    metered[metrics["unique_count"]] = {
        "model": "volume",
        "tiers": [{"up_to": 10, "unit_amount": "90"}, {"up_to": None, "unit_amount": "60"}],
        "filters": [{"match": {"region": "ap"}, "model": "per_unit", "unit_amount": "125"}],
    }
    metered[metrics["sum"]] = {
        "model": "per_unit",
        "unit_amount": "0.75",
        "included": "10",
        "filters": [
            {
                "match": {"model": "large", "type": "input"},
                "model": "graduated",
                "included": 50,
                "tiers": [
                    {"up_to": 200, "unit_amount": "2.5"},
                    {"up_to": None, "unit_amount": "1.25", "flat_amount": 300},
                ],
            },
            {"match": {"model": "large"}, "model": "per_unit", "unit_amount": "1.5"},
            {"match": {"type": "output", "region": "eu"}, "model": "volume",
             "tiers": [{"up_to": 100, "unit_amount": "0.9"},
                       {"up_to": None, "unit_amount": "0.4", "flat_amount": 55}]},
        ],
    }  # fmt: skip
    return {"metered": metered}


def label(metric: str, match: dict[str, str] | None) -> str:
    if match is None:
        return f"{metric}[other]"
    return metric + "[" + ",".join(f"{k}={v}" for k, v in sorted(match.items())) + "]"


def oracle_lines(
    scene: Scene, plan: dict[str, Any], start: datetime, end: datetime
) -> dict[str, tuple[Decimal, int]]:
    """Each priced filter's quantity and amount from the raw events of [start, end): an event
    goes to the first filter its properties match, else to the default."""
    lines = {}
    for metric, price in plan["metered"].items():
        if "filters" not in price:
            events = [
                e
                for e in scene.oracle.counted.values()
                if e.metric == metric and start <= e.timestamp < end
            ]
            quantity = (
                Oracle._aggregate(scene.oracle.meters[metric], events) if events else Decimal(0)
            )
            lines[metric] = (quantity, oracle_amount(quantity, price))
            continue
        filters = price["filters"]
        chosen: dict[str, list[Posted]] = {label(metric, f["match"]): [] for f in filters}
        chosen[label(metric, None)] = []
        for e in scene.oracle.counted.values():
            if e.metric != metric or not start <= e.timestamp < end:
                continue
            first = next(
                (
                    f
                    for f in filters
                    if all(e.properties.get(k) == v for k, v in f["match"].items())
                ),
                None,
            )
            chosen[label(metric, first["match"] if first else None)].append(e)
        for name, events in chosen.items():
            if not events:
                lines[name] = (Decimal(0), 0)
                continue
            quantity = Oracle._aggregate(scene.oracle.meters[metric], events)
            match = next((f for f in filters if label(metric, f["match"]) == name), price)
            lines[name] = (quantity, oracle_amount(quantity, match))
    return lines


def test_a_plan_priced_per_dimension_filter_is_billed_to_the_cent_against_the_raw_events(
    scene: Scene,
) -> None:
    plan = filtered_plan(scene.metrics)
    key = f"filtered-{secrets.token_hex(3)}"
    path = scene.tmp / "plans.json"
    path.write_text(json.dumps({"plans": [{"key": key, "price_monthly": 1900, "features": plan}]}))
    applied = run_cli(scene.env, "plans", "apply", str(path), "--json")
    assert applied.returncode == 0, applied.stderr
    with unit_of_work(scene.engine) as session:
        plan_id = session.scalars(sa.select(Plan.id).where(Plan.key == key)).one()
        subscription = create_subscription(
            session,
            organization_id=scene.tenant.organization_id,
            plan_id=plan_id,
            interval=BillingInterval.MONTH,
            now=scene.start,
        )
        period_end = subscription.current_period_end
    done = run_cli(
        scene.env, "billing", "run", "--organization", str(scene.tenant.organization_id),
        "--no-stripe", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    invoices = json.loads(done.stdout)["invoices"]
    # The month anchored 30 days ago, and the one after it if that closed already.
    assert {i["period_start"] for i in invoices} <= {
        scene.start.isoformat(),
        period_end.isoformat(),
    }
    reached = set()
    for invoice in invoices:
        start = datetime.fromisoformat(invoice["period_start"])
        end = datetime.fromisoformat(invoice["period_end"])
        got = {
            line["metric"]: (Decimal(line["quantity"]), line["amount"])
            for line in invoice["lines"]
            if line["kind"] == "usage"
        }
        expected = oracle_lines(scene, plan, start, end)
        assert got == expected, invoice["period_start"]
        assert invoice["total"] == 1900 + sum(amount for _, amount in expected.values())
        reached |= {name for name, (quantity, _) in expected.items() if quantity}
    assert len(reached) == 16  # every line of the plan (filters, defaults) priced some usage


def test_a_meters_value_property_is_the_value_path_of_the_openmeter_route(scene: Scene) -> None:
    (metric,) = [m for m in scene.oracle.meters if m.startswith("gpu_seconds_")]
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    events = [
        {"specversion": "1.0", "id": f"gpu-{i}", "source": "test", "type": metric,
         "subject": str(scene.tenant.organization_id), "time": rfc3339(at),
         "data": {"seconds": seconds, "region": region}}
        for i, (seconds, region) in enumerate([("2.5", "eu"), (4, "eu"), ("0.25", "us")])
    ]  # fmt: skip
    response = httpx.post(
        scene.url + "/openmeter/api/v1/events",
        content=json.dumps(events),
        headers={**bearer(scene.tenant.key), "Content-Type": "application/cloudevents-batch+json"},
        timeout=30,
    )
    assert response.status_code == 204, response.text
    wait_for(
        lambda: sum(n for _, n in fetch_usage(scene, metric, "month").values()) == 3,
        timeout=60,
        what="the OpenMeter events counted",
    )
    assert fetch_usage(scene, metric, "month", ("region",)) == {
        (truncate(at, "month"), "eu"): (Decimal("6.5"), 2),
        (truncate(at, "month"), "us"): (Decimal("0.25"), 1),
    }
