"""Meter-priced lines bill every event in the period its timestamp falls in, whatever the anchor
second: a subscription anchored at :17:33 with a plan change and a cancellation off the hour,
events posted through the real ingest service at, 1 s before and 1 s after each boundary (and at
the edges of the windows they cut), counted by the real aggregator, billed by `meterline billing
run`. Prices per dimension filter and unfiltered prices of max, latest and unique_count meters;
an oracle that prices the raw posted events by their timestamps agrees with every line to the
cent.

One organization has its cuts registered before any event (the aggregator keeps the meter pieces),
the other after half its events (registration computes them from the ledger) and before the rest
(late events, into the pieces of windows already cut). A replay restores corrupted pieces exactly,
and a second replay changes nothing."""

from __future__ import annotations

import itertools
import json
import secrets
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared.db import unit_of_work
from shared.models import BillingInterval, Plan
from shared.subscriptions import cancel_now, change_plan, create_subscription, period_bounds
from shared.usage_cuts import Cut, register_cuts
from tests.aggregator_support import AggregatorProcess, create_topics, wait_for
from tests.e2e.test_billing_through_ingest import share
from tests.e2e.test_meters_through_ingest import (
    Oracle,
    Posted,
    label,
    oracle_amount,
    run_cli,
    wire,
)
from tests.ingest_support import bearer, make_tenant, rfc3339, run_ingest

REGIONS = ("eu", "us", "ap")
FLAT = {"a": 1900, "c": 4100}


def meters_of(suffix: str) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    metrics = {
        "sum": f"tokens_{suffix}",
        "count": f"calls_{suffix}",
        "max": f"seats_{suffix}",
        "latest": f"storage_{suffix}",
        "unique_count": f"users_{suffix}",
    }
    meters = {
        metrics["sum"]: {"aggregation": "sum", "dimensions": ["region"]},
        metrics["count"]: {"aggregation": "count", "dimensions": ["region"]},
        metrics["max"]: {"aggregation": "max", "dimensions": ["region"]},
        metrics["latest"]: {"aggregation": "latest", "dimensions": ["region"]},
        metrics["unique_count"]: {
            "aggregation": "unique_count",
            "property": "user_id",
            "dimensions": ["region"],
        },
    }
    return metrics, meters


def plan_features(metrics: dict[str, str], scale: int) -> dict[str, Any]:
    """Filtered prices of a sum and a count meter, unfiltered ones of max, latest, unique_count."""
    by_region = {
        "model": "per_unit",
        "unit_amount": str(3 * scale),
        "filters": [
            {"match": {"region": "eu"}, "model": "per_unit", "unit_amount": str(7 * scale)},
            {"match": {"region": "us"}, "model": "package", "package_size": 2,
             "package_amount": 40 * scale},
        ],
    }  # fmt: skip
    return {
        "metered": {
            metrics["sum"]: by_region,
            metrics["count"]: by_region,
            metrics["max"]: {"model": "per_unit", "unit_amount": str(11 * scale)},
            metrics["latest"]: {"model": "per_unit", "unit_amount": str(13 * scale)},
            metrics["unique_count"]: {"model": "per_unit", "unit_amount": str(17 * scale)},
        }
    }


def instants(boundaries: list[datetime], now: datetime) -> list[datetime]:
    """At, 1 s before and 1 s after each boundary, and the edges of the window it cuts."""
    found = []
    for b in boundaries:
        hour = b.replace(minute=0, second=0, microsecond=0)
        found += [
            b - timedelta(seconds=1),
            b,
            b + timedelta(seconds=1),
            hour,
            hour + timedelta(minutes=5),
            b + timedelta(minutes=9),
            hour + timedelta(hours=1) - timedelta(seconds=1),
        ]
    return [at for at in found if at <= now]


def make_events(
    metrics: dict[str, str], moments: list[datetime], prefix: str, salt: int
) -> list[Posted]:
    events = []
    for i, at in enumerate(moments):
        for j, aggregation in enumerate(metrics):
            n = i * 5 + j + salt
            properties = {"region": REGIONS[n % 3]}
            if aggregation == "unique_count":
                properties["user_id"] = f"u{n % 7}"
            quantity = Decimal((n * 37) % 91 + 1) / 4
            events.append(
                Posted(f"{prefix}{i}-{j}", metrics[aggregation], quantity, at, properties)
            )
    return events


def segment_lines(
    oracle: Oracle, features: dict[str, Any], events: list[Posted], start: datetime, end: datetime
) -> list[tuple[str, Decimal, int]]:
    """Each line of one segment from its raw events: an event goes to the first filter its
    properties match, else to the default; each line is its meter's aggregation."""
    lines = []
    for metric, price in features["metered"].items():
        mine = [e for e in events if e.metric == metric and start <= e.timestamp < end]
        filters = price.get("filters")
        if not filters:
            quantity = Oracle._aggregate(oracle.meters[metric], mine) if mine else Decimal(0)
            lines.append((metric, quantity, oracle_amount(quantity, price)))
            continue
        chosen: dict[str, list[Posted]] = {label(metric, f["match"]): [] for f in filters}
        chosen[label(metric, None)] = []
        for e in mine:
            first = next(
                (
                    f
                    for f in filters
                    if all(e.properties.get(k) == v for k, v in f["match"].items())
                ),
                None,
            )
            chosen[label(metric, first["match"] if first else None)].append(e)
        for name, its in chosen.items():
            quantity = Oracle._aggregate(oracle.meters[metric], its) if its else Decimal(0)
            match = next((f for f in filters if label(metric, f["match"]) == name), price)
            lines.append((name, quantity, oracle_amount(quantity, match)))
    return lines


def piece_rows(engine: Engine, organization_id: uuid.UUID) -> tuple[set[Any], set[Any]]:
    with engine.connect() as connection:
        pieces = {
            tuple(row)
            for row in connection.execute(
                sa.text(
                    "SELECT metric, dimensions::text, window_start, piece_start, quantity,"
                    " event_count, max_quantity, min_quantity, latest_quantity, latest_at,"
                    " latest_event_id FROM meter_pieces WHERE organization_id = :org"
                ),
                {"org": organization_id},
            )
        }
        values = {
            tuple(row)
            for row in connection.execute(
                sa.text(
                    "SELECT metric, dimensions::text, window_start, piece_start, value"
                    " FROM meter_piece_values WHERE organization_id = :org"
                ),
                {"org": organization_id},
            )
        }
    return pieces, values


def test_meter_priced_lines_bill_each_event_in_its_period_and_replay_restores_pieces(
    engine: Engine, service_env: dict[str, str], tmp_path: Path
) -> None:
    prefix = f"e{secrets.token_hex(4)}"
    env = {**service_env, "METERLINE_TOPIC_PREFIX": prefix}
    create_topics(
        env["KAFKA_BOOTSTRAP_SERVERS"],
        [f"{prefix}.usage.events", f"{prefix}.usage.events.dlq"],
        partitions=2,
    )
    metrics, meters = meters_of(secrets.token_hex(3))
    meter_path = tmp_path / "meters.json"
    meter_path.write_text(json.dumps({"meters": [{"metric": m, **d} for m, d in meters.items()]}))
    applied = run_cli(env, "meters", "apply", str(meter_path), "--json")
    assert applied.returncode == 0, applied.stderr
    features = {"a": plan_features(metrics, 1), "c": plan_features(metrics, 2)}
    keys = {name: f"edges-{name}-{secrets.token_hex(3)}" for name in features}
    plan_path = tmp_path / "plans.json"
    plan_path.write_text(
        json.dumps(
            {
                "plans": [
                    {"key": keys[name], "price_monthly": FLAT[name], "features": features[name]}
                    for name in features
                ]
            }
        )
    )
    applied = run_cli(env, "plans", "apply", str(plan_path), "--json")
    assert applied.returncode == 0, applied.stderr

    now = datetime.now(UTC).replace(microsecond=0)
    anchor = (now - timedelta(days=34)).replace(minute=17, second=33)
    first_end = period_bounds(anchor, 0, "month")[1]
    canceled = (now - timedelta(hours=20)).replace(minute=41, second=3)
    changed = (first_end + (canceled - first_end) / 2).replace(microsecond=0, minute=29, second=7)
    second_end = period_bounds(anchor, 1, "month")[1]
    boundaries = [anchor, first_end, changed, canceled]
    with unit_of_work(engine) as session:
        plan_ids = {
            name: session.scalars(sa.select(Plan.id).where(Plan.key == key)).one()
            for name, key in keys.items()
        }
    tenants = [make_tenant(engine) for _ in range(2)]
    subscriptions = {}
    for tenant in tenants:
        with unit_of_work(engine) as session:
            subscriptions[tenant.organization_id] = create_subscription(
                session,
                organization_id=tenant.organization_id,
                plan_id=plan_ids["a"],
                interval=BillingInterval.MONTH,
                now=anchor,
            ).id
        with unit_of_work(engine) as session:
            change_plan(
                session, subscriptions[tenant.organization_id], plan_id=plan_ids["c"], now=changed
            )
        with unit_of_work(engine) as session:
            cancel_now(session, subscriptions[tenant.organization_id], now=canceled)
    cuts = {t.organization_id: [Cut(t.organization_id, at) for at in boundaries] for t in tenants}
    # The first organization's cuts before any of its events: the aggregator keeps the pieces.
    with engine.begin() as connection:
        register_cuts(connection, cuts[tenants[0].organization_id])

    moments = instants(boundaries, now)
    posted = {
        t.organization_id: make_events(metrics, moments, f"o{n}-", salt=n)
        for n, t in enumerate(tenants)
    }
    # The second organization's late events: the same instants, posted after its cuts exist.
    late = make_events(metrics, moments, "late-", salt=5)
    oracles = {t.organization_id: Oracle(meters) for t in tenants}

    def counted(organization_id: uuid.UUID, expected: int) -> bool:
        with engine.connect() as connection:
            found = connection.execute(
                sa.text(
                    "SELECT coalesce(sum(event_count), 0) FROM meter_windows"
                    " WHERE organization_id = :org"
                ),
                {"org": organization_id},
            ).scalar_one()
        return int(found) == expected

    def post(client: httpx.Client, tenant: Any, events: list[Posted]) -> None:
        for offset in range(0, len(events), 40):
            batch = events[offset : offset + 40]
            response = client.post(
                "/v1/events", json={"events": [wire(e) for e in batch]}, headers=bearer(tenant.key)
            )
            assert response.status_code == 202, response.text
            oracles[tenant.organization_id].accept(batch)

    with run_ingest(env, tmp_path / "ingest.log") as server:
        aggregator = AggregatorProcess(env, tmp_path / "aggregator.log").start()
        try:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for tenant in tenants:
                    post(client, tenant, posted[tenant.organization_id])
                for tenant in tenants:
                    org = tenant.organization_id
                    wait_for(lambda org=org: counted(org, len(oracles[org].counted)),
                             timeout=90, what="every posted event counted")  # fmt: skip
                second = tenants[1]
                with engine.begin() as connection:
                    register_cuts(connection, cuts[second.organization_id])
                post(client, second, late)
                wait_for(
                    lambda: counted(
                        second.organization_id, len(oracles[second.organization_id].counted)
                    ),
                    timeout=90,
                    what="every late event counted",
                )
        finally:
            aggregator.stop()

    segments_of = {
        anchor: (first_end, first_end, [(anchor, first_end, "a")]),
        first_end: (canceled, second_end, [(first_end, changed, "a"), (changed, canceled, "c")]),
    }
    for tenant in tenants:
        org = tenant.organization_id
        oracle = oracles[org]
        events = list(oracle.counted.values())
        done = run_cli(env, "billing", "run", "--organization", str(org), "--no-stripe", "--json")
        assert done.returncode == 0, done.stderr
        invoices = {i["period_start"]: i for i in json.loads(done.stdout)["invoices"]}
        for start, (end, anchored_end, segments) in segments_of.items():
            invoice = invoices[start.isoformat()]
            assert invoice["period_end"] == end.isoformat()
            expected = [
                line
                for a, b, plan in segments
                for line in segment_lines(oracle, features[plan], events, a, b)
            ]
            got = [
                (line["metric"], Decimal(line["quantity"]), line["amount"])
                for line in invoice["lines"]
                if line["kind"] == "usage"
            ]
            assert Counter(got) == Counter(expected), (tenant, start)
            whole = anchored_end - start
            flat = FLAT[segments[0][2]]
            for (_, _, before), (at, _, after) in itertools.pairwise(segments):
                remaining = anchored_end - at
                flat += share(FLAT[after], remaining, whole) - share(FLAT[before], remaining, whole)
            if end < anchored_end:
                flat -= share(FLAT[segments[-1][2]], anchored_end - end, whole)
            assert invoice["total"] == flat + sum(amount for _, _, amount in expected)

    # Replay restores corrupted pieces exactly; a second replay changes nothing.
    org = tenants[1].organization_id
    before = piece_rows(engine, org)
    assert before[0] and before[1]
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE meter_pieces SET quantity = quantity + 5, max_quantity = 0,"
                " latest_quantity = 99 WHERE organization_id = :org AND ctid IN"
                " (SELECT ctid FROM meter_pieces WHERE organization_id = :org LIMIT 6)"
            ),
            {"org": org},
        )
        connection.execute(
            sa.text(
                "DELETE FROM meter_pieces WHERE ctid IN (SELECT ctid FROM meter_pieces"
                " WHERE organization_id = :org ORDER BY piece_start DESC LIMIT 3)"
            ),
            {"org": org},
        )
        connection.execute(
            sa.text(
                "DELETE FROM meter_piece_values WHERE ctid IN (SELECT ctid FROM"
                " meter_piece_values WHERE organization_id = :org LIMIT 2)"
            ),
            {"org": org},
        )
    assert piece_rows(engine, org) != before
    window = ("--from", rfc3339(anchor - timedelta(hours=1)), "--to", rfc3339(now))
    for _ in range(2):
        replayed = run_cli(env, "replay", *window, "--organization", str(org), "--json")
        assert replayed.returncode == 0, replayed.stderr
        assert piece_rows(engine, org) == before
