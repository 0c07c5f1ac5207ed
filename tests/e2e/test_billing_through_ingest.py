"""Every accepted event billed in exactly one period, whatever the anchor second: events posted
through the real ingest service and counted by the real aggregator, at, just before and just after
every period, segment and window boundary of subscriptions anchored off the hour (a plan change,
a cancellation and a new subscription in the same window included), then billed by
`meterline billing run`; an oracle that prices the raw posted events by their timestamps agrees
with every invoice to the cent.

One organization has its usage cuts registered before the events arrive (the aggregator keeps
them), the other only at billing time (registration reads them from the ledger)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import Engine

from shared.db import unit_of_work
from shared.models import BillingInterval
from shared.subscriptions import cancel_now, change_plan, create_subscription, period_bounds
from shared.usage_cuts import Cut, register_cuts
from tests import factories
from tests.aggregator_support import AggregatorProcess, totals, wait_for
from tests.ingest_support import bearer, make_tenant, rfc3339, run_ingest

METERLINE = str(Path(sys.executable).parent / "meterline")
PLAN_A = {
    "metered": {
        "api_calls": {
            "model": "graduated",
            "included": 5,
            "tiers": [
                {"up_to": 50, "unit_amount": "0.5"},
                {"up_to": None, "unit_amount": "0.2", "flat_amount": 100},
            ],
        },
        "seats": {"model": "per_unit", "unit_amount": "10", "aggregation": "max"},
    }
}
PLAN_C = {
    "metered": {
        "api_calls": {"model": "per_unit", "unit_amount": "2"},
        "seats": {"model": "per_unit", "unit_amount": "7", "aggregation": "max"},
    }
}
FLAT = {"a": 2500, "c": 7001}


def half_up(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def oracle_usage(plan: str, events: list[tuple[datetime, str, Decimal]]) -> int:
    """The usage amount of one segment from its raw events, worked out without Meterline."""
    calls = sum((q for _, m, q in events if m == "api_calls"), Decimal(0))
    windows: dict[datetime, Decimal] = {}
    for at, metric, quantity in events:
        if metric == "seats":
            hour = at.replace(minute=0, second=0, microsecond=0)
            windows[hour] = windows.get(hour, Decimal(0)) + quantity
    seats = max(windows.values(), default=Decimal(0))
    if plan == "a":
        billable = max(Decimal(0), calls - 5)
        amount = min(billable, Decimal(50)) * Decimal("0.5")
        if billable > 50:
            amount += (billable - 50) * Decimal("0.2") + 100
        return half_up(amount) + half_up(seats * 10)
    return half_up(calls * 2) + half_up(seats * 7)


def share(fee: int, part: timedelta, whole: timedelta) -> int:
    tick = timedelta(microseconds=1)
    return half_up(Decimal(fee) * Decimal(part // tick) / Decimal(whole // tick))


@dataclass(frozen=True)
class Expected:
    subscription_id: uuid.UUID
    start: datetime
    end: datetime
    anchored_end: datetime
    segments: list[tuple[datetime, datetime, str]]

    def total(self, posted: list[tuple[datetime, str, Decimal]]) -> int:
        whole = self.anchored_end - self.start
        flat = FLAT[self.segments[0][2]]
        for (_, _, before), (at, _, after) in zip(self.segments, self.segments[1:], strict=False):
            remaining = self.anchored_end - at
            flat += share(FLAT[after], remaining, whole) - share(FLAT[before], remaining, whole)
        if self.end < self.anchored_end:
            flat -= share(FLAT[self.segments[-1][2]], self.anchored_end - self.end, whole)
        used = sum(
            oracle_usage(plan, [e for e in posted if a <= e[0] < b]) for a, b, plan in self.segments
        )
        return flat + used


def near(moment: datetime) -> list[datetime]:
    """At, just before and just after an instant, and the window boundaries around it."""
    hour = moment.replace(minute=0, second=0, microsecond=0)
    tiny = timedelta(milliseconds=1)
    return [
        moment - timedelta(seconds=1),
        moment - tiny,
        moment,
        moment + tiny,
        moment + timedelta(seconds=1),
        hour - tiny,
        hour,
        hour + timedelta(hours=1) - tiny,
        hour + timedelta(hours=1),
    ]


def test_an_oracle_pricing_the_raw_events_agrees_with_every_invoice_to_the_cent(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    env = {**service_env, "METERLINE_TOPIC_PREFIX": topic_prefix}
    now = datetime.now(UTC).replace(microsecond=0)
    anchor = (now - timedelta(days=34)).replace(minute=27, second=45)
    first_end = period_bounds(anchor, 0, "month")[1]
    canceled = (now - timedelta(hours=20)).replace(minute=41, second=3)
    changed = first_end + (canceled - first_end) / 2
    changed = changed.replace(microsecond=0) + timedelta(seconds=7)
    resumed = canceled + timedelta(seconds=9)
    with unit_of_work(engine) as session:
        plan_a = factories.make_plan(session, price_monthly=FLAT["a"], features=PLAN_A).id
        plan_c = factories.make_plan(session, price_monthly=FLAT["c"], features=PLAN_C).id
    tenants = [make_tenant(engine) for _ in range(2)]
    expected: dict[uuid.UUID, list[Expected]] = {}
    for tenant in tenants:
        with unit_of_work(engine) as session:
            a = create_subscription(
                session,
                organization_id=tenant.organization_id,
                plan_id=plan_a,
                interval=BillingInterval.MONTH,
                now=anchor,
            ).id
        with unit_of_work(engine) as session:
            change_plan(session, a, plan_id=plan_c, now=changed)
        with unit_of_work(engine) as session:
            cancel_now(session, a, now=canceled)
        with unit_of_work(engine) as session:
            b = create_subscription(
                session,
                organization_id=tenant.organization_id,
                plan_id=plan_c,
                interval=BillingInterval.MONTH,
                now=resumed,
            ).id
        second_end = period_bounds(anchor, 1, "month")[1]
        expected[tenant.organization_id] = [
            Expected(a, anchor, first_end, first_end, [(anchor, first_end, "a")]),
            Expected(
                a, first_end, canceled, second_end,
                [(first_end, changed, "a"), (changed, canceled, "c")],
            ),
            Expected(
                b, resumed, period_bounds(resumed, 0, "month")[1],
                period_bounds(resumed, 0, "month")[1], [(resumed, now + timedelta(days=40), "c")],
            ),
        ]  # fmt: skip
    # The first organization's cuts are registered now, before any of its events exists (what a
    # billing run does for the boundaries it bills across; a run here would finalize the closed
    # periods without their usage, which would then come as adjustments).
    with engine.begin() as connection:
        register_cuts(
            connection,
            [
                Cut(tenants[0].organization_id, at)
                for at in (anchor, first_end, changed, canceled, resumed)
            ],
        )

    instants = [
        at
        for boundary in (anchor, first_end, changed, canceled, resumed)
        for at in near(boundary)
        if at <= now
    ] + [now - timedelta(hours=h, minutes=h * 7 % 60) for h in range(1, 30, 3)]
    posted: dict[uuid.UUID, dict[str, tuple[datetime, str, Decimal]]] = {}
    with run_ingest(env, tmp_path / "ingest.log") as server:
        aggregator = AggregatorProcess(env, tmp_path / "aggregator.log").start()
        try:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for t_index, tenant in enumerate(tenants):
                    events = []
                    for i, at in enumerate(instants):
                        metric = "seats" if i % 3 == 0 else "api_calls"
                        quantity = Decimal(i % 7 + 1 + t_index)
                        events.append(
                            {
                                "id": f"o{i}",
                                "metric": metric,
                                "quantity": str(quantity),
                                "timestamp": rfc3339(at),
                            }
                        )
                    for offset in range(0, len(events), 25):
                        batch = events[offset : offset + 25]
                        response = client.post(
                            "/v1/events", json={"events": batch}, headers=bearer(tenant.key)
                        )
                        assert response.status_code == 202, response.text
                    posted[tenant.organization_id] = {
                        e["id"]: (
                            datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")),
                            e["metric"],
                            Decimal(e["quantity"]),
                        )
                        for e in events
                    }
            wait_for(
                lambda: all(
                    totals(engine, t.organization_id)[1] == len(posted[t.organization_id])
                    for t in tenants
                ),
                timeout=90,
                what="every posted event counted",
            )
        finally:
            aggregator.stop()

    for tenant in tenants:
        done = run_billing(env, tenant.organization_id)
        assert done.returncode == 0, done.stderr
        invoices = {
            (uuid.UUID(i["subscription_id"]), i["period_start"]): i
            for i in json.loads(done.stdout)["invoices"]
        }
        events = list(posted[tenant.organization_id].values())
        billed = 0
        for period in expected[tenant.organization_id]:
            invoice = invoices[(period.subscription_id, period.start.isoformat())]
            assert invoice["period_end"] == period.end.isoformat()
            assert invoice["total"] == period.total(events), (tenant, period)
            billed += sum(
                Decimal(line["quantity"])
                for line in invoice["lines"]
                if line["metric"] == "api_calls"
            )
        # Every api_calls unit billed once: all of them but those before the first subscription
        # and in the gap between the cancellation and the new subscription.
        unbilled = sum(
            (
                q
                for at, m, q in events
                if m == "api_calls" and (at < anchor or canceled <= at < resumed)
            ),
            Decimal(0),
        )
        assert billed == sum(q for _, m, q in events if m == "api_calls") - unbilled


def run_billing(env: dict[str, str], organization_id: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [METERLINE, "billing", "run", "--organization", str(organization_id), "--no-stripe",
         "--json"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
