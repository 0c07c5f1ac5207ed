"""Where one aggregator batch's time goes: Python, and each SQL statement (bench_aggregator (d)).

The batch is applied in process, as the aggregator's worker thread applies it
(`services.aggregator.service.BatchApplier.apply`), to a fresh bench database: ROUNDS batches of
500 envelopes (the aggregator's default batch) of 100 events and of 1 event, the first of each
kind not counted (it creates the month's ledger partition and warms caches). Every statement is
timed from the driver's call to its return (SQLAlchemy cursor events), so "database" is the driver
call: psycopg adapting the parameters (Python), the network and PostgreSQL's work; "Python" is the
rest: decoding, validation, fingerprints, the ledger's selection and the parameters' building.
What the real process adds (waiting for Kafka and Faust between batches, and for the interpreter
lock its consumer holds) is (a)'s wall time less its batch time, printed there.
"""

from __future__ import annotations

import os
import secrets
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from services.aggregator.batch import SourceRecord
from services.aggregator.service import BatchApplier
from shared.events import Envelope, UsageEvent, encode_envelope
from shared.settings import load_settings
from tests.bench import figures
from tests.bench.bench_ingest import bench_database, organization_ids, seed_keys

ROUNDS = int(os.environ.get("BENCH_BATCH_ROUNDS", "4"))
MESSAGES = 500
SHOWN = 6


def records(orgs: list[uuid.UUID], per: int, run: str, now: datetime) -> list[SourceRecord]:
    found = []
    for n in range(MESSAGES):
        org = orgs[n % len(orgs)]
        events = [
            UsageEvent(id=f"{run}-{n}-{i}", metric="api_calls", quantity=1, timestamp=now)  # type: ignore[arg-type]
            for i in range(per)
        ]
        value = encode_envelope(
            Envelope(v=1, organization_id=org, api_key_id=None, received_at=now, events=events)
        )
        found.append(SourceRecord("bench", 0, n, None, org.bytes, value))
    return found


def profile_batches(admin_url: str, organizations: int) -> None:
    print(
        f"(d) where a batch's time goes: {MESSAGES} envelopes of 100 and of 1 event applied in "
        f"process, {ROUNDS - 1} batches of each timed",
        flush=True,
    )
    with bench_database(admin_url) as url:
        seed_keys(url, organizations)
        engine = sa.create_engine(url)
        orgs = organization_ids(engine)
        applier = BatchApplier(engine, load_settings(database_url=url))
        spent: dict[str, float] = defaultdict(float)

        @event.listens_for(engine, "before_cursor_execute")
        def started(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            conn.info["statement_started"] = time.perf_counter()

        @event.listens_for(engine, "after_cursor_execute")
        def finished(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            spent[" ".join(statement.split())[:70]] += (
                time.perf_counter() - conn.info["statement_started"]
            )

        try:
            for per in (100, 1):
                spent.clear()
                wall = 0.0
                for round_ in range(ROUNDS):
                    batch = records(orgs, per, secrets.token_hex(3), datetime.now(UTC))
                    if round_ == 0:
                        applier.apply(batch)
                        spent.clear()
                        continue
                    begun = time.perf_counter()
                    applier.apply(batch)
                    wall += time.perf_counter() - begun
                report(per, wall / (ROUNDS - 1), {k: v / (ROUNDS - 1) for k, v in spent.items()})
        finally:
            engine.dispose()


def report(per: int, wall: float, statements: dict[str, float]) -> None:
    database = sum(statements.values())
    python = wall - database
    events = MESSAGES * per
    print(
        f"  envelopes of {per}: {wall * 1000:,.0f} ms a batch of {events:,} events "
        f"({wall / events * 1e6:,.1f} us an event): Python {python * 1000:,.0f} ms "
        f"({100 * python / wall:.0f}%), database {database * 1000:,.0f} ms "
        f"({100 * database / wall:.0f}%)",
        flush=True,
    )
    for statement, seconds in sorted(statements.items(), key=lambda kv: -kv[1])[:SHOWN]:
        print(f"    {seconds * 1000:8.1f} ms  {statement}", flush=True)
    figures.record(
        **{
            f"batch{per}_us_per_event": wall / events * 1e6,
            f"batch{per}_python_share": python / wall,
        }
    )
