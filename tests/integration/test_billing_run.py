"""`meterline billing run` over seeded usage_records: invoices computed by hand, idempotent reruns,
late usage after finalisation as an adjustment on the next invoice."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared.db import unit_of_work
from shared.models import Invoice, Plan, Subscription, UsageRecord
from tests import factories

ROOT = Path(__file__).resolve().parents[2]
MELINE = str(ROOT / ".venv" / "bin" / "meterline")
# Periods in the past: a run may not bill as of a time after now.
NOV = datetime(2026, 7, 1, tzinfo=UTC)
FEATURES = {
    "metered": {
        "api_calls": {
            "included": 100000,
            "model": "graduated",
            "tiers": [
                {"up_to": 1000000, "unit_amount": "0.05"},
                {"up_to": None, "unit_amount": "0.02", "flat_amount": 500},
            ],
        },
        "storage_gb": {"included": 0, "model": "per_unit", "unit_amount": "12.5"},
        "exports": {"included": 10, "model": "package", "package_size": 100, "package_amount": 200},
        "seats": {
            "included": 0,
            "model": "volume",
            "aggregation": "max",
            "tiers": [{"up_to": 10, "unit_amount": "800"}, {"up_to": None, "unit_amount": "600"}],
        },
    }
}


def seed(engine: Engine, *, interval: str = "month") -> dict[str, Any]:
    """An organization on the DESIGN.md example plan (4900/month, 49000/year) with two projects."""
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session)
        project_a = factories.make_project(session, organization)
        project_b = factories.make_project(session, organization)
        plan = factories.make_plan(
            session, price_monthly=4900, price_yearly=49000, features=FEATURES
        )
        subscription = factories.make_subscription(
            session,
            organization,
            plan,
            interval=factories.BillingInterval(interval),
            period_start=NOV,
            period_end=datetime(2026, 8, 1, tzinfo=UTC) if interval == "month" else None,
        )
        return {
            "organization_id": organization.id,
            "subscription_id": subscription.id,
            "projects": (project_a.id, project_b.id),
        }


def add_usage(
    engine: Engine, org: dict[str, Any], rows: list[tuple[int, str, datetime, str]]
) -> None:
    """rows: (project index, metric, window start, quantity)."""
    with unit_of_work(engine) as session:
        for project, metric, window_start, quantity in rows:
            session.add(
                UsageRecord(
                    organization_id=org["organization_id"],
                    project_id=org["projects"][project],
                    api_key_id=None,
                    metric=metric,
                    window_start=window_start,
                    window_seconds=3600,
                    quantity=Decimal(quantity),
                    event_count=1,
                )
            )


def billing_run(
    service_env: dict[str, str], org: dict[str, Any], as_of: datetime, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            MELINE,
            "billing",
            "run",
            "--as-of",
            as_of.isoformat(),
            "--organization",
            str(org["organization_id"]),
            "--no-stripe",
            "--json",
            *extra,
        ],
        check=False,
        env=service_env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def november_usage(org: dict[str, Any]) -> list[tuple[int, str, datetime, str]]:
    h = lambda n: NOV + timedelta(hours=n)  # noqa: E731
    return [
        (0, "api_calls", h(1), "1500000"),
        (1, "api_calls", h(2), "600000"),
        (0, "storage_gb", h(1), "1.25"),
        (1, "storage_gb", h(5), "2.25"),
        (0, "exports", h(3), "250"),
        # seats ("max"): window h(1) sums both projects to 11; window h(2) has 8; max is 11.
        (0, "seats", h(1), "6"),
        (1, "seats", h(1), "5"),
        (0, "seats", h(2), "8"),
        # Outside the period: never billed in November.
        (0, "api_calls", NOV - timedelta(hours=1), "999999"),
        (0, "api_calls", datetime(2026, 8, 1, tzinfo=UTC), "999999"),
    ]


def lines_of(invoice: dict[str, Any]) -> dict[tuple[str, str], tuple[str, str, int]]:
    return {
        (line["metric"], line["kind"]): (
            line["quantity"],
            line["billable_quantity"],
            line["amount"],
        )
        for line in invoice["lines"]
    }


def test_billing_run_prices_seeded_usage_as_computed_by_hand(
    service_env: dict[str, str], engine: Engine
) -> None:
    org = seed(engine)
    add_usage(engine, org, november_usage(org))

    result = billing_run(service_env, org, datetime(2026, 7, 20, tzinfo=UTC))

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {"as_of", "invoices", "reported", "mismatches"}
    assert document["reported"] == [] and document["mismatches"] == []
    [invoice] = document["invoices"]
    assert set(invoice) == {
        "id", "organization_id", "subscription_id", "period_start", "period_end",
        "currency", "status", "flat_amount", "flat_lines", "lines", "total",
    }  # fmt: skip
    assert invoice["status"] == "draft"
    assert invoice["flat_amount"] == 4900
    assert [line["amount"] for line in invoice["flat_lines"]] == [4900]
    assert {k: (Decimal(q), Decimal(b), a) for k, (q, b, a) in lines_of(invoice).items()} == {
        # 2,000,000 billable: 1,000,000 x 0.05 + 1,000,000 x 0.02 + 500 flat of tier 2
        ("api_calls", "usage"): (Decimal(2100000), Decimal(2000000), 70500),
        # 3.5 x 12.5 = 43.75 -> 44 (half up, once)
        ("storage_gb", "usage"): (Decimal("3.5"), Decimal("3.5"), 44),
        # 240 billable -> 3 packages of 100 at 200
        ("exports", "usage"): (Decimal(250), Decimal(240), 600),
        # max window 11 seats, all at the second volume tier: 11 x 600
        ("seats", "usage"): (Decimal(11), Decimal(11), 6600),
    }
    assert invoice["total"] == 4900 + 70500 + 44 + 600 + 6600
    assert all(isinstance(line["amount"], int) for line in invoice["lines"])
    assert all(isinstance(line["quantity"], str) for line in invoice["lines"])


def _snapshot(engine: Engine, subscription_id: Any) -> list[Any]:
    with engine.connect() as connection:
        invoices = connection.execute(
            sa.select(Invoice.id, Invoice.status, Invoice.total, Invoice.updated_at)
            .where(Invoice.subscription_id == subscription_id)
            .order_by(Invoice.period_start)
        ).all()
        lines = connection.execute(
            sa.select(Invoice.id, Invoice.lines)
            .where(Invoice.subscription_id == subscription_id)
            .order_by(Invoice.period_start)
        ).all()
        subscription = connection.execute(
            sa.select(Subscription.current_period_start, Subscription.updated_at).where(
                Subscription.id == subscription_id
            )
        ).all()
    return [invoices, lines, subscription]


def test_a_second_run_with_no_new_usage_changes_nothing(
    service_env: dict[str, str], engine: Engine
) -> None:
    org = seed(engine)
    add_usage(engine, org, november_usage(org))
    as_of = datetime(2026, 8, 2, tzinfo=UTC)
    first = billing_run(service_env, org, as_of)
    assert first.returncode == 0, first.stderr
    before = _snapshot(engine, org["subscription_id"])

    second = billing_run(service_env, org, as_of)

    assert second.returncode == 0, second.stderr
    assert _snapshot(engine, org["subscription_id"]) == before
    assert [status for _, status, _, _ in before[0]] == ["final", "draft"]
    assert json.loads(second.stdout)["reported"] == []


def test_a_second_run_lists_the_same_invoices_with_the_same_amounts(
    service_env: dict[str, str], engine: Engine
) -> None:
    org = seed(engine)
    add_usage(engine, org, november_usage(org))
    as_of = datetime(2026, 8, 2, tzinfo=UTC)
    first = json.loads(billing_run(service_env, org, as_of).stdout)

    second = json.loads(billing_run(service_env, org, as_of).stdout)

    assert [(i["period_start"][:10], i["status"]) for i in second["invoices"]] == [
        ("2026-07-01", "final"),
        ("2026-08-01", "draft"),
    ]
    assert second["invoices"] == first["invoices"]
    assert second["invoices"][0]["total"] == 4900 + 70500 + 44 + 600 + 6600
    assert second["reported"] == [] and second["mismatches"] == []


def test_the_human_summary_of_a_rerun_lists_its_invoices_and_says_none_changed(
    service_env: dict[str, str], engine: Engine
) -> None:
    org = seed(engine)
    add_usage(engine, org, november_usage(org))
    as_of = datetime(2026, 8, 2, tzinfo=UTC)
    billing_run(service_env, org, as_of)
    command = [MELINE, "billing", "run", "--as-of", as_of.isoformat(), "--no-stripe"]
    command += ["--organization", str(org["organization_id"])]

    rerun = subprocess.run(
        command, check=False, env=service_env, capture_output=True, text=True, timeout=120
    )

    assert rerun.returncode == 0, rerun.stderr
    assert "2 invoices, 0 changed" in rerun.stdout
    assert "2026-07-01" in rerun.stdout and "2026-08-01" in rerun.stdout


def test_late_usage_after_finalisation_is_an_adjustment_on_the_next_invoice(
    service_env: dict[str, str], engine: Engine
) -> None:
    org = seed(engine)
    add_usage(engine, org, november_usage(org))
    closed = billing_run(service_env, org, datetime(2026, 8, 2, tzinfo=UTC))
    november = next(i for i in json.loads(closed.stdout)["invoices"] if i["status"] == "final")
    # A late event for November: 1,000,000 more API calls, all in the 0.02 tier.
    add_usage(engine, org, [(1, "api_calls", NOV + timedelta(days=20), "1000000")])

    result = billing_run(service_env, org, datetime(2026, 8, 3, tzinfo=UTC))

    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)["invoices"]
    assert [i["period_start"][:10] for i in listed] == ["2026-07-01", "2026-08-01"]
    assert listed[0] == november
    december = listed[1]
    assert december["status"] == "draft"
    assert lines_of(december)[("api_calls", "adjustment")] == ("1000000", "1000000", 20000)
    # December's own usage: 999,999 calls on Dec 1, 899,999 billable x 0.05 = 44,999.95 -> 45,000.
    assert lines_of(december)[("api_calls", "usage")] == ("999999", "899999", 45000)
    assert december["total"] == 4900 + 45000 + 20000
    with engine.connect() as connection:
        stored_total = connection.execute(
            sa.select(Invoice.total).where(Invoice.id == november["id"])
        ).scalar_one()
    assert stored_total == november["total"]


def test_a_yearly_plan_bills_the_yearly_flat_fee(
    service_env: dict[str, str], engine: Engine
) -> None:
    org = seed(engine, interval="year")
    add_usage(engine, org, [(0, "exports", NOV + timedelta(days=100), "111")])

    result = billing_run(service_env, org, datetime(2026, 11, 1, tzinfo=UTC))

    [invoice] = json.loads(result.stdout)["invoices"]
    assert invoice["flat_amount"] == 49000
    # 111 - 10 included = 101 billable exports: two started packages of 100 at 200.
    assert invoice["total"] == 49000 + 400


def test_a_dry_run_prints_invoices_but_writes_nothing(
    service_env: dict[str, str], engine: Engine
) -> None:
    org = seed(engine)
    add_usage(engine, org, [(0, "exports", NOV + timedelta(hours=1), "20")])

    result = billing_run(service_env, org, datetime(2026, 7, 20, tzinfo=UTC), "--dry-run")

    [invoice] = json.loads(result.stdout)["invoices"]
    assert invoice["total"] == 4900 + 200
    assert _snapshot(engine, org["subscription_id"])[0] == []


def test_a_run_is_refused_while_another_holds_the_billing_lock(
    service_env: dict[str, str], engine: Engine
) -> None:
    from services.billing.runner import billing_lock

    org = seed(engine)
    with billing_lock(engine) as held:
        assert held
        result = billing_run(service_env, org, datetime(2026, 7, 20, tzinfo=UTC))

    assert result.returncode == 1
    assert "another billing run is in progress" in result.stderr
    assert "Traceback" not in result.stderr
    assert _snapshot(engine, org["subscription_id"])[0] == []


def test_periods_billed_after_a_month_end_keep_the_anchor_day(
    service_env: dict[str, str], engine: Engine
) -> None:
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session)
        plan = factories.make_plan(session, price_monthly=1000)
        factories.make_subscription(
            session,
            organization,
            plan,
            period_start=datetime(2026, 1, 31, tzinfo=UTC),
            period_end=datetime(2026, 2, 28, tzinfo=UTC),
        )
        org = {"organization_id": organization.id}

    result = billing_run(service_env, org, datetime(2026, 4, 1, tzinfo=UTC))

    assert result.returncode == 0, result.stderr
    assert [
        (i["period_start"][:10], i["period_end"][:10], i["status"])
        for i in json.loads(result.stdout)["invoices"]
    ] == [
        ("2026-01-31", "2026-02-28", "final"),
        ("2026-02-28", "2026-03-31", "final"),
        ("2026-03-31", "2026-04-30", "draft"),
    ]


def test_a_canceled_subscription_settled_before_the_horizon_is_left_alone_while_others_bill(
    service_env: dict[str, str], engine: Engine
) -> None:
    september = datetime(2026, 5, 1, tzinfo=UTC)
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session)
        project = factories.make_project(session, organization)
        plan = factories.make_plan(session, price_monthly=4900, features=FEATURES)
        old = factories.make_subscription(
            session,
            organization,
            plan,
            status=factories.SubscriptionStatus.CANCELED,
            period_start=september,
            period_end=datetime(2026, 6, 1, tzinfo=UTC),
        )
        live = factories.make_subscription(
            session,
            organization,
            plan,
            period_start=NOV,
            period_end=datetime(2026, 8, 1, tzinfo=UTC),
        )
        org = {"organization_id": organization.id, "projects": (project.id, project.id)}
    add_usage(engine, org, [(0, "exports", september + timedelta(days=3), "250")])
    settled = billing_run(service_env, org, datetime(2026, 6, 2, tzinfo=UTC))
    assert settled.returncode == 0, settled.stderr
    before = _snapshot(engine, old.id)
    assert [status for _, status, _, _ in before[0]] == ["final"]
    add_usage(engine, org, [(0, "exports", NOV + timedelta(days=3), "20")])

    # December 10: September's period ended 70 days ago, beyond the 35-day horizon.
    result = billing_run(service_env, org, datetime(2026, 8, 10, tzinfo=UTC))

    assert result.returncode == 0, result.stderr
    assert _snapshot(engine, old.id) == before
    listed = json.loads(result.stdout)["invoices"]
    assert [(i["subscription_id"], i["period_start"][:10], i["status"]) for i in listed] == [
        (str(live.id), "2026-07-01", "final"),
        (str(live.id), "2026-08-01", "draft"),
    ]
    assert listed[0]["total"] == 4900 + 200


def _reprice(engine: Engine, org: dict[str, Any]) -> None:
    """The plan's second api_calls tier doubles (0.02 -> 0.04) and storage costs 20, not 12.5."""
    features = json.loads(json.dumps(FEATURES))
    features["metered"]["api_calls"]["tiers"][1]["unit_amount"] = "0.04"
    features["metered"]["storage_gb"]["unit_amount"] = "20"
    with unit_of_work(engine) as session:
        subscription = session.get(Subscription, org["subscription_id"])
        assert subscription is not None
        session.execute(
            sa.update(Plan).where(Plan.id == subscription.plan_id).values(features=features)
        )


def test_a_plan_price_change_does_not_reprice_a_final_period(
    service_env: dict[str, str], engine: Engine
) -> None:
    org = seed(engine)
    add_usage(engine, org, november_usage(org))
    assert billing_run(service_env, org, datetime(2026, 8, 2, tzinfo=UTC)).returncode == 0
    _reprice(engine, org)

    result = billing_run(service_env, org, datetime(2026, 8, 3, tzinfo=UTC))

    assert result.returncode == 0, result.stderr
    november, december = json.loads(result.stdout)["invoices"]
    assert november["total"] == 4900 + 70500 + 44 + 600 + 6600
    assert [line["kind"] for line in december["lines"]] == ["usage"] * 4


def test_late_usage_of_a_final_period_is_priced_with_that_period_s_plan(
    service_env: dict[str, str], engine: Engine
) -> None:
    org = seed(engine)
    add_usage(engine, org, november_usage(org))
    assert billing_run(service_env, org, datetime(2026, 8, 2, tzinfo=UTC)).returncode == 0
    _reprice(engine, org)
    add_usage(engine, org, [(1, "api_calls", NOV + timedelta(days=20), "1000000")])

    result = billing_run(service_env, org, datetime(2026, 8, 3, tzinfo=UTC))

    assert result.returncode == 0, result.stderr
    december = json.loads(result.stdout)["invoices"][1]
    # 1,000,000 late calls in November's second tier at November's 0.02, not today's 0.04.
    assert {k: v for k, v in lines_of(december).items() if k[1] == "adjustment"} == {
        ("api_calls", "adjustment"): ("1000000", "1000000", 20000)
    }


def _status(engine: Engine, subscription_id: Any) -> tuple[Any, ...]:
    with engine.connect() as connection:
        return tuple(
            connection.execute(
                sa.select(
                    Subscription.status,
                    Subscription.canceled_at,
                    Subscription.current_period_start,
                ).where(Subscription.id == subscription_id)
            ).one()
        )


def test_a_subscription_set_to_cancel_gets_no_period_after_its_current_one(
    service_env: dict[str, str], engine: Engine
) -> None:
    org = seed(engine)
    with unit_of_work(engine) as session:
        subscription = session.get(Subscription, org["subscription_id"])
        assert subscription is not None
        subscription.cancel_at_period_end = True
    add_usage(engine, org, november_usage(org))

    result = billing_run(service_env, org, datetime(2026, 8, 2, tzinfo=UTC))
    later = billing_run(service_env, org, datetime(2026, 9, 2, tzinfo=UTC))

    assert result.returncode == 0, result.stderr
    assert later.returncode == 0, later.stderr
    for run in (result, later):
        assert [
            (i["period_start"][:10], i["status"]) for i in json.loads(run.stdout)["invoices"]
        ] == [("2026-07-01", "final")]
    assert _status(engine, org["subscription_id"]) == (
        "canceled",
        datetime(2026, 8, 1, tzinfo=UTC),
        NOV,
    )


def test_a_period_within_the_trial_charges_neither_flat_fee_nor_usage(
    service_env: dict[str, str], engine: Engine
) -> None:
    org = seed(engine)
    with unit_of_work(engine) as session:
        subscription = session.get(Subscription, org["subscription_id"])
        assert subscription is not None
        subscription.status = factories.SubscriptionStatus.TRIALING
        subscription.trial_end = datetime(2026, 8, 1, tzinfo=UTC)
    add_usage(engine, org, november_usage(org))

    result = billing_run(service_env, org, datetime(2026, 8, 2, tzinfo=UTC))

    assert result.returncode == 0, result.stderr
    november, december = json.loads(result.stdout)["invoices"]
    assert (november["flat_amount"], november["total"]) == (0, 0)
    assert lines_of(november)[("api_calls", "usage")] == ("2100000", "0", 0)
    # The trial ended when December began: December pays its flat fee and its usage.
    assert december["flat_amount"] == 4900
    assert lines_of(december)[("api_calls", "usage")] == ("999999", "899999", 45000)


def test_a_tiny_quantity_is_printed_as_a_plain_decimal_string(
    service_env: dict[str, str], engine: Engine
) -> None:
    org = seed(engine)
    add_usage(engine, org, [(0, "storage_gb", NOV + timedelta(hours=1), "0.0000001")])

    result = billing_run(service_env, org, datetime(2026, 7, 20, tzinfo=UTC))

    assert result.returncode == 0, result.stderr
    [invoice] = json.loads(result.stdout)["invoices"]
    assert lines_of(invoice)[("storage_gb", "usage")] == ("0.0000001", "0.0000001", 0)


def test_an_incomplete_subscription_is_not_billed(
    service_env: dict[str, str], engine: Engine
) -> None:
    org = seed(engine)
    with unit_of_work(engine) as session:
        subscription = session.get(Subscription, org["subscription_id"])
        assert subscription is not None
        subscription.status = factories.SubscriptionStatus.INCOMPLETE
    add_usage(engine, org, november_usage(org))

    result = billing_run(service_env, org, datetime(2026, 8, 2, tzinfo=UTC))

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["invoices"] == []
    assert _snapshot(engine, org["subscription_id"])[0] == []


def test_a_run_as_of_a_time_after_now_is_refused_with_one_line_and_writes_nothing(
    service_env: dict[str, str], engine: Engine
) -> None:
    org = seed(engine)
    add_usage(engine, org, november_usage(org))
    future = datetime.now(UTC) + timedelta(days=100)

    refused = billing_run(service_env, org, future)
    previewed = billing_run(service_env, org, future, "--dry-run")

    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "later than now" in refused.stderr and "--dry-run" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert previewed.returncode == 0, previewed.stderr
    assert len(json.loads(previewed.stdout)["invoices"]) >= 5
    assert _snapshot(engine, org["subscription_id"])[0] == []
    assert _status(engine, org["subscription_id"])[2] == NOV


def test_a_run_as_of_now_within_the_clock_tolerance_is_accepted(
    service_env: dict[str, str], engine: Engine
) -> None:
    org = seed(engine)

    result = billing_run(service_env, org, datetime.now(UTC) + timedelta(seconds=20))

    assert result.returncode == 0, result.stderr


def test_a_settled_final_invoice_is_kept_when_its_period_comes_back(
    service_env: dict[str, str], engine: Engine
) -> None:
    """New invoices are copied straight into the table: a final one past the lateness horizon
    (not read by the run) for a period the subscription was moved back to must be neither
    planned again nor collide with the new rows; the run succeeds and the final one stays."""
    org = seed(engine)
    add_usage(engine, org, november_usage(org))
    assert billing_run(service_env, org, datetime(2026, 8, 2, tzinfo=UTC)).returncode == 0
    july = _snapshot(engine, org["subscription_id"])[0][0]
    with engine.begin() as connection:
        connection.execute(
            sa.update(Subscription)
            .where(Subscription.id == org["subscription_id"])
            .values(current_period_start=NOV, current_period_end=datetime(2026, 8, 1, tzinfo=UTC))
        )

    result = billing_run(service_env, org, datetime(2026, 10, 2, tzinfo=UTC))

    assert result.returncode == 0, result.stderr
    assert _snapshot(engine, org["subscription_id"])[0][0] == july
