"""Billing run benchmark: pricing and invoices (no Stripe calls) over 10,000 subscriptions.

Loads, into a database of its own, 10,000 organizations with one monthly subscription each on a
plan with 5 metered metrics (sum and max, every pricing model), and hourly usage_records for the
month, generated server-side by INSERT ... SELECT over generate_series, in chunks of organizations
so that it prints its progress. Then times `run_billing` (first run: every invoice is new; second
run: nothing changes) and, apart, the run's own totals step over the same segments (step 3 of
services/billing/service.py), in one process. Goals, as ratios of that totals step: the first run
at most 2x, the rerun with nothing new at most 0.5x.

usage_records is loaded with its triggers off (a bulk backfill), then usage_daily, the daily
rollup billing reads, is built in one INSERT ... SELECT (`usage_daily_rebuild()`) and the triggers
are turned back on. Last, the cost of those triggers to the aggregator: the same batches applied
through BatchApplier with the triggers on and off, in events/s.

BENCH_BILLING_SUBSCRIPTIONS (default 10000) and BENCH_BILLING_HOURS (default 720, every hour of the
month: 36M usage rows; 72 gives 3.6M) change the size.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from shared import migrate
from shared.settings import load_settings
from tests.bench import figures

PERIOD_START = datetime(2026, 10, 1, tzinfo=UTC)
HORIZON = timedelta(days=35)
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


_TIMINGS: dict[str, float] = {}


def _load(engine: sa.Engine, subscriptions: int, hours: int) -> int:
    """Plans, organizations and subscriptions, then usage_records in parallel server-side INSERTs.

    As PostgreSQL's "Populating a Database" advises, the table's indexes and foreign keys are
    dropped for the bulk insert and recreated after from their own definitions (read from the
    catalog), so the table ends exactly as the migrations made it, logged and fully indexed.
    """
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
        connection.execute(sa.text("ANALYZE organizations"))
        # A bulk backfill: the rollup is built once after the load, not row batch by row batch.
        connection.execute(sa.text("ALTER TABLE usage_records DISABLE TRIGGER USER"))
        restore = _drop_usage_indexes(connection)
    started = time.perf_counter()
    _insert_usage(engine, step, subscriptions)
    _TIMINGS["insert"] = time.perf_counter() - started
    print("  rebuilding indexes and keys of usage_records", flush=True)
    started = time.perf_counter()
    with engine.begin() as connection:
        connection.execute(sa.text("SET LOCAL maintenance_work_mem = '1GB'"))
        for statement in restore:
            connection.execute(sa.text(statement))
    _TIMINGS["indexes"] = time.perf_counter() - started
    print("  building usage_daily", flush=True)
    started = time.perf_counter()
    with engine.begin() as connection:
        connection.execute(sa.text("SET LOCAL work_mem = '1GB'"))
        connection.execute(sa.text("SELECT usage_daily_rebuild()"))
        connection.execute(sa.text("ALTER TABLE usage_records ENABLE TRIGGER USER"))
    _TIMINGS["backfill"] = time.perf_counter() - started
    print("  vacuum and analyze", flush=True)
    started = time.perf_counter()
    # VACUUM (not only ANALYZE): sets the visibility map, as autovacuum would soon after a load.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("VACUUM (ANALYZE) usage_records"))
        connection.execute(sa.text("VACUUM (ANALYZE) usage_daily"))
        connection.execute(sa.text("ANALYZE"))
        count = connection.execute(sa.text("SELECT count(*) FROM usage_records")).scalar_one()
    _TIMINGS["vacuum"] = time.perf_counter() - started
    return int(count)


def _drop_usage_indexes(connection: sa.Connection) -> list[str]:
    """Drop usage_records' foreign keys and secondary indexes; return the DDL to recreate them."""
    constraints = connection.execute(
        sa.text(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = 'usage_records'::regclass AND contype IN ('f', 'u')"
        )
    ).all()
    indexes = connection.execute(
        sa.text(
            "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x"
            " JOIN pg_class i ON i.oid = x.indexrelid"
            " WHERE x.indrelid = 'usage_records'::regclass AND NOT x.indisprimary"
            " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.oid)"
        )
    ).all()
    for name, _ in constraints:
        connection.execute(sa.text(f'ALTER TABLE usage_records DROP CONSTRAINT "{name}"'))
    for name, _ in indexes:
        connection.execute(sa.text(f'DROP INDEX "{name}"'))
    return [definition for _, definition in indexes] + [
        f'ALTER TABLE usage_records ADD CONSTRAINT "{name}" {definition}'
        for name, definition in constraints
    ]


# Quantities: a cheap integer hash of (organization, metric, hour), 0.00 to 999.99, so every
# window differs and nothing per row converts to text.
_INSERT_USAGE = sa.text(
    "INSERT INTO usage_records (id, organization_id, project_id, api_key_id, metric,"
    " window_start, window_seconds, quantity, event_count)"
    " SELECT gen_random_uuid(), o.id, NULL, NULL, m.metric,"
    "        CAST(:start AS timestamptz) + make_interval(hours => h), 3600,"
    "        ((o.n * 7919 + m.i * 104729 + CAST(h AS bigint) * 15485863) % 100000) / 100.0,"
    "        1"
    " FROM (SELECT id, n FROM (SELECT id, row_number() OVER (ORDER BY id) AS n"
    "       FROM organizations) AS numbered WHERE n % :parts = :part) AS o"
    " CROSS JOIN unnest(CAST(:metrics AS text[])) WITH ORDINALITY AS m(metric, i)"
    " CROSS JOIN generate_series(0, 719, :step) AS h"
)
# One INSERT at a time per core: the load is CPU-bound (uuid generation, hashing, tuple forming).
_LOAD_SESSIONS = max(1, min(4, os.cpu_count() or 1))
# Organizations are loaded in this many chunks, each one INSERT, so that progress shows.
_LOAD_CHUNKS = 50


def _insert_usage(engine: sa.Engine, step: int, subscriptions: int) -> None:
    expected = subscriptions * len(METRICS) * len(range(0, 720, step))
    started = time.perf_counter()
    done = 0
    lock = threading.Lock()

    def insert(part: int) -> None:
        nonlocal done
        with engine.begin() as connection:
            rows = connection.execute(
                _INSERT_USAGE,
                {
                    "start": PERIOD_START,
                    "metrics": list(METRICS),
                    "step": step,
                    "parts": _LOAD_CHUNKS,
                    "part": part,
                },
            ).rowcount
        with lock:
            done += rows
            elapsed = time.perf_counter() - started
            left = elapsed / done * (expected - done) if done else 0.0
            print(
                f"  loading usage_records: {done:,} / {expected:,} rows "
                f"({done / expected:.0%}), {elapsed:.0f}s elapsed, about {left:.0f}s left",
                flush=True,
            )

    with ThreadPoolExecutor(_LOAD_SESSIONS) as pool:
        list(pool.map(insert, range(_LOAD_CHUNKS)))


def _full_run(engine: sa.Engine, as_of: datetime) -> tuple[Any, list[Any]]:
    """The run's step 1 for every subscription (no billing state skips any), and the segments its
    step 3 totals."""
    from services.billing import service

    run = service._Run(
        engine,
        service.RunResult(run_id=None, as_of=as_of),
        as_of=as_of,
        now=as_of,
        since=as_of - HORIZON,
        dry_run=True,
        report=False,
        horizon=HORIZON,
    )
    _, work, _ = run.read(None, None, ignore_states=True)
    return run, service._queries(work, as_of)


def _totals_seconds(run: Any, queries: list[Any]) -> float:
    """The run's step 3 alone: the cuts' parts and every segment's totals in one snapshot."""
    started = time.perf_counter()
    run.totals(queries, [])
    return time.perf_counter() - started


def _explain(engine: sa.Engine, queries: list[Any]) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of each totals statement, one line per plan node: its time
    (inclusive of its children, per process), and its rows summed over all processes."""
    from services.billing import usage_totals

    lines = []
    queries = [query for _, query in queries]
    max_metrics = sorted({m for q in queries for m in q.max_metrics})
    with engine.begin() as connection:
        staged = usage_totals.stage_periods(connection, queries)
        tables = {"periods": staged.periods, "edges": staged.edges}
        statements: list[tuple[str, str, dict[str, Any]]] = [
            ("sum totals", usage_totals._SUM_TOTALS, {})
        ]
        if max_metrics:
            statements.append(("max totals", usage_totals._MAX_TOTALS, {"metrics": max_metrics}))
        for label, sql, params in statements:
            [[plan]] = connection.execute(
                sa.text("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql.format(**tables)),
                params,
            ).all()
            lines.append(f"  {label}: {plan[0]['Execution Time'] / 1000:.2f}s (instrumented)")
            lines += _plan_lines(plan[0]["Plan"], 2)
        usage_totals.drop_periods(connection, staged)
    return lines


def _plan_lines(node: dict[str, Any], depth: int) -> list[str]:
    what = " ".join(
        part for part in (node.get("Partial Mode"), node.get("Strategy"), node["Node Type"]) if part
    )
    if "Relation Name" in node:
        what += f" on {node['Relation Name']}"
    loops = node.get("Actual Loops", 1)
    detail = (
        f"{node['Actual Total Time'] / 1000:.2f}s, {node['Actual Rows'] * loops:,} rows"
        + (f", {node['Workers Launched']} workers" if "Workers Launched" in node else "")
        + (f", {node['Sort Method']}" if "Sort Method" in node else "")
        + (f", {node['HashAgg Batches']} batches" if node.get("HashAgg Batches", 1) > 1 else "")
        + (
            f", buffers hit {node['Shared Hit Blocks']:,} read {node['Shared Read Blocks']:,}"
            if "Relation Name" in node
            else ""
        )
    )
    lines = [f"{'  ' * depth}{what}: {detail}"]
    for child in node.get("Plans", []):
        lines += _plan_lines(child, depth + 1)
    return lines


def main() -> None:
    from services.billing import service

    subscriptions = int(os.environ.get("BENCH_BILLING_SUBSCRIPTIONS", "10000"))
    hours = int(os.environ.get("BENCH_BILLING_HOURS", "720"))
    settings = load_settings()
    admin_url = make_url(settings.database_url)
    name, url = _create_database(admin_url)
    engine = sa.create_engine(url, pool_size=_LOAD_SESSIONS + 1)
    try:
        migrate.upgrade(url)
        started = time.perf_counter()
        rows = _load(engine, subscriptions, hours)
        load_seconds = time.perf_counter() - started
        print(
            f"loaded {rows:,} usage rows for {subscriptions:,} subscriptions in {load_seconds:.1f}s"
            f" ({rows / load_seconds:,.0f} rows/s; {_TIMINGS['insert']:.1f}s insert in "
            f"{_LOAD_SESSIONS} sessions with the triggers off, {_TIMINGS['indexes']:.1f}s "
            f"indexes and keys, {_TIMINGS['backfill']:.1f}s backfill of usage_daily in one "
            f"INSERT ... SELECT, {_TIMINGS['vacuum']:.1f}s vacuum and analyze)"
        )

        as_of = PERIOD_END + timedelta(hours=1)
        print(f"load average before the first run: {_load_average()}")
        started = time.perf_counter()
        first = service.run_billing(
            engine, as_of=as_of, now=as_of, lateness_horizon=HORIZON, list_invoices=False
        )
        first_seconds = time.perf_counter() - started
        print(
            f"first run: {first_seconds:.2f}s, {len(first.invoices):,} invoices written "
            f"({rows / first_seconds:,.0f} usage rows/s); its steps: {_steps(first)}"
        )
        started = time.perf_counter()
        second = service.run_billing(
            engine, as_of=as_of, now=as_of, lateness_horizon=HORIZON, list_invoices=False
        )
        second_seconds = time.perf_counter() - started
        print(
            f"second run (nothing new): {second_seconds:.2f}s ({_steps(second)}), "
            f"{len(second.invoices)} invoices written, {second.skipped:,} subscriptions skipped"
        )

        # Measured after the runs, on a warm cache like theirs: what one run spends reading.
        started = time.perf_counter()
        run, queries = _full_run(engine, as_of)
        prepare_seconds = time.perf_counter() - started
        totals = [_totals_seconds(run, queries) for _ in range(2)]
        totals_seconds = min(totals)
        print(
            f"totals step alone: {totals_seconds:.2f}s over {len(queries):,} segments (runs: "
            f"{', '.join(f'{t:.2f}s' for t in totals)}; load average {_load_average()}); "
            f"reading subscriptions and invoices {prepare_seconds:.2f}s"
        )
        first_ratio, second_ratio = first_seconds / totals_seconds, second_seconds / totals_seconds
        figures.record(billing_subscriptions=subscriptions, billing_seconds=first_seconds)
        if subscriptions == 10_000:
            figures.record(billing_seconds_10k=first_seconds)
        print(
            f"ratios to the totals step: first run {first_ratio:.2f}x (goal <= 2: "
            f"{'met' if first_ratio <= 2 else 'NOT met'}), rerun {second_ratio:.2f}x (goal <= 0.5: "
            f"{'met' if second_ratio <= 0.5 else 'NOT met'})"
        )
        print("totals statements (EXPLAIN ANALYZE, BUFFERS):")
        print("\n".join(_explain(engine, queries)))
        print(_trigger_cost(engine, url))
    finally:
        engine.dispose()
        _drop_database(admin_url, name)


# The aggregator's side: batches of BATCH_ENVELOPES envelopes of 5 events (one per metric) from
# TRIGGER_ORGANIZATIONS organizations, as a live stream writes them, through BatchApplier.
_TRIGGER_BATCHES = 20
_BATCH_ENVELOPES = 200
_TRIGGER_ORGANIZATIONS = 50


def _trigger_cost(engine: sa.Engine, url: str) -> str:
    """events/s of BatchApplier with usage_records' triggers on and off, alternated twice."""
    from services.aggregator.batch import SourceRecord
    from services.aggregator.service import BatchApplier
    from shared.events import Envelope, UsageEvent, encode_envelope

    with engine.connect() as connection:
        organizations = list(
            connection.execute(
                sa.text("SELECT id FROM organizations ORDER BY id LIMIT :n"),
                {"n": _TRIGGER_ORGANIZATIONS},
            ).scalars()
        )
    applier = BatchApplier(engine, load_settings().model_copy(update={"database_url": url}))
    offsets = iter(range(10**9))

    def batch(now: datetime) -> list[SourceRecord]:
        records = []
        for n in range(_BATCH_ENVELOPES):
            events = [
                UsageEvent(
                    id=secrets.token_hex(8),
                    metric=metric,
                    quantity=Decimal(n % 97) / 10,
                    timestamp=now - timedelta(seconds=n),
                )
                for metric in METRICS
            ]
            envelope = Envelope(
                v=1,
                organization_id=organizations[n % len(organizations)],
                api_key_id=None,
                received_at=now,
                events=events,
            )
            records.append(
                SourceRecord(
                    "bench.usage.events", 0, next(offsets), None, None, encode_envelope(envelope)
                )
            )
        return records

    rates: dict[bool, list[float]] = {True: [], False: []}
    for enabled in (True, False, True, False):
        with engine.begin() as connection:
            state = "ENABLE" if enabled else "DISABLE"
            connection.execute(sa.text(f"ALTER TABLE usage_records {state} TRIGGER USER"))
        batches = [batch(datetime.now(UTC)) for _ in range(_TRIGGER_BATCHES)]
        started = time.perf_counter()
        counted = sum(applier.apply(records).counted for records in batches)
        rates[enabled].append(counted / (time.perf_counter() - started))
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE usage_records ENABLE TRIGGER USER"))
    on, off = max(rates[True]), max(rates[False])
    return (
        f"aggregator with the usage_daily triggers: {on:,.0f} events/s, without: {off:,.0f}"
        f" events/s ({_TRIGGER_BATCHES} batches of {_BATCH_ENVELOPES * len(METRICS)} events"
        f" over {len(organizations)} organizations, best of 2 each; cost"
        f" {(1 - on / off) * 100:.0f}%; load average {_load_average()})"
    )


def _steps(result: Any) -> str:
    return ", ".join(f"{step} {seconds:.2f}s" for step, seconds in result.step_seconds.items())


def _load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    main()
