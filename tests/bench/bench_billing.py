"""Billing run benchmark: pricing and invoices (no Stripe calls) over 10,000 subscriptions.

Loads, into a database of its own, 10,000 organizations with one monthly subscription each on a
plan with 5 metered metrics (sum and max, every pricing model), and hourly usage_records for the
month, generated server-side in one INSERT ... SELECT over generate_series per table. Then times
`run_billing` (first run: every invoice is new; second run: nothing changes) and, apart, the one
set-based totals query, to show where the time goes. Goal: the first run under 10 s.

BENCH_BILLING_SUBSCRIPTIONS (default 10000) and BENCH_BILLING_HOURS (default 72: 3.6M usage rows;
720 is every hour of the month, 36M rows) change the size.
"""

from __future__ import annotations

import os
import secrets
import time
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from shared import migrate
from shared.settings import load_settings

PERIOD_START = datetime(2026, 10, 1, tzinfo=UTC)
PERIOD_END = datetime(2026, 11, 1, tzinfo=UTC)
METRICS = ("api_calls", "storage_gb", "exports", "seats", "egress_gb")
FEATURES = """{"metered": {
  "api_calls": {"included": 1000, "model": "graduated", "tiers": [
      {"up_to": 100000, "unit_amount": "0.05"},
      {"up_to": null, "unit_amount": "0.02", "flat_amount": 500}]},
  "storage_gb": {"model": "per_unit", "unit_amount": "12.5"},
  "exports": {"included": 10, "model": "package", "package_size": 100, "package_amount": 200},
  "seats": {"model": "volume", "aggregation": "max", "tiers": [
      {"up_to": 10, "unit_amount": "800"}, {"up_to": null, "unit_amount": "600"}]},
  "egress_gb": {"model": "per_unit", "unit_amount": "0.333"}}}"""


def _create_database(admin_url: sa.URL) -> tuple[str, str]:
    name = f"meterline_bench_billing_{secrets.token_hex(3)}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, admin_url.set(database=name).render_as_string(hide_password=False)


def _drop_database(admin_url: sa.URL, name: str) -> None:
    """Drop the benchmark's database; an autovacuum worker still in it makes FORCE fail for a
    non-superuser, so wait for it rather than leave gigabytes behind."""
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        for attempt in range(30):
            try:
                with admin.connect() as connection:
                    connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                return
            except sa.exc.DBAPIError:
                if attempt == 29:
                    raise
                time.sleep(1)
    finally:
        admin.dispose()


def _load(engine: sa.Engine, subscriptions: int, hours: int) -> int:
    step = max(1, 720 // hours)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO plans (id, key, name, price_monthly, price_yearly, currency,"
                " features) VALUES (gen_random_uuid(), 'bench', 'Bench', 4900, 49000, 'usd',"
                " CAST(:f AS jsonb))"
            ),
            {"f": FEATURES},
        )
        connection.execute(
            sa.text(
                "INSERT INTO organizations (id, name, slug)"
                " SELECT gen_random_uuid(), 'Org ' || n, 'bench-' || n"
                " FROM generate_series(1, :n) AS n"
            ),
            {"n": subscriptions},
        )
        connection.execute(
            sa.text(
                "INSERT INTO subscriptions (id, organization_id, plan_id, status, billing_interval,"
                " current_period_start, current_period_end, cancel_at_period_end)"
                " SELECT gen_random_uuid(), o.id, p.id, 'active', 'month', :start, :end, false"
                " FROM organizations o CROSS JOIN plans p WHERE p.key = 'bench'"
            ),
            {"start": PERIOD_START, "end": PERIOD_END},
        )
        connection.execute(
            sa.text(
                "INSERT INTO usage_records (id, organization_id, project_id, api_key_id, metric,"
                " window_start, window_seconds, quantity, event_count)"
                " SELECT gen_random_uuid(), o.id, NULL, NULL, m.metric,"
                "        CAST(:start AS timestamptz) + make_interval(hours => h), 3600,"
                "        ((abs(hashtext(o.id::text || m.metric || h)) % 100000) / 100.0)::numeric,"
                "        1"
                " FROM organizations o"
                " CROSS JOIN unnest(CAST(:metrics AS text[])) AS m(metric)"
                " CROSS JOIN generate_series(0, 719, :step) AS h"
            ),
            {"start": PERIOD_START, "metrics": list(METRICS), "step": step},
        )
        count = connection.execute(sa.text("SELECT count(*) FROM usage_records")).scalar_one()
        connection.execute(sa.text("ANALYZE"))
    return int(count)


def main() -> None:
    from services.billing import repository, service

    subscriptions = int(os.environ.get("BENCH_BILLING_SUBSCRIPTIONS", "10000"))
    hours = int(os.environ.get("BENCH_BILLING_HOURS", "72"))
    settings = load_settings()
    admin_url = make_url(settings.database_url)
    name, url = _create_database(admin_url)
    engine = sa.create_engine(url, pool_size=2)
    try:
        migrate.upgrade(url)
        started = time.perf_counter()
        rows = _load(engine, subscriptions, hours)
        load_seconds = time.perf_counter() - started
        print(
            f"loaded {rows:,} usage rows for {subscriptions:,} subscriptions in {load_seconds:.1f}s"
            f" ({rows / load_seconds:,.0f} rows/s)"
        )

        as_of = PERIOD_END + timedelta(hours=1)
        started = time.perf_counter()
        first = service.run_billing(
            engine, as_of=as_of, now=as_of, lateness_horizon=timedelta(days=35)
        )
        first_seconds = time.perf_counter() - started
        started = time.perf_counter()
        second = service.run_billing(
            engine, as_of=as_of, now=as_of, lateness_horizon=timedelta(days=35)
        )
        second_seconds = time.perf_counter() - started

        # Measured after the runs, on a warm cache like theirs: what one run spends reading.
        started = time.perf_counter()
        with engine.connect() as connection:
            work = service._prepare(connection, as_of, timedelta(days=35), None)
        prepare_seconds = time.perf_counter() - started
        started = time.perf_counter()
        with engine.begin() as connection:
            totals = repository.period_totals(connection, service._queries(work))
        totals_seconds = time.perf_counter() - started

        print(
            f"first run: {first_seconds:.2f}s, {len(first.invoices):,} invoices written "
            f"({rows / first_seconds:,.0f} usage rows/s, goal < 10 s: "
            f"{'met' if first_seconds < 10 else 'NOT met'})"
        )
        print(
            f"second run (nothing new): {second_seconds:.2f}s, "
            f"{len(second.invoices)} invoices written"
        )
        print(
            f"where the time goes: load subscriptions and invoices {prepare_seconds:.2f}s, "
            f"totals query {totals_seconds:.2f}s "
            f"({sum(len(v) for v in totals.values()):,} totals), "
            f"pricing, invoices and writes: the rest of the first run "
            f"{max(0.0, first_seconds - prepare_seconds - totals_seconds):.2f}s"
        )
    finally:
        engine.dispose()
        _drop_database(admin_url, name)


if __name__ == "__main__":
    main()
