"""Aggregator throughput and visibility latency against the real broker and database.

(a) The aggregator alone: a topic pre-filled with envelopes of 100 events (ingest's batch shape)
    and of 1 event, then `meterline aggregate run`: events/s from the first counted event to the
    last (start-up and the group join are not counted).
(a'') Meters, one instance: the same pre-filled topic size in envelopes of 100, every event of a
    metered metric: half `tokens` (sum, three dimensions: model x type x region, 24 value sets)
    and half `active_users` (unique_count of user_id among 5,000 users, by region); events/s
    printed beside (a)'s plain figure of the same run (goal: dimensional / plain >= 0.70).
(a') The storm, one instance: STORM_EVENTS fresh events in envelopes of 100, then each of their
    ids again with another quantity (STORM_EVENTS conflicting duplicates, every one dead-lettered).
    Both phases are timed alike, from the first record produced to the last one processed, and
    the storm's rate is printed beside the fresh one (storm / fresh must stay >= 0.5: dead
    letters may not throttle counting) and beside (a)'s.
(b) End to end: `meterline ingest serve --workers 2` + the aggregator, wrk posting batches of 100
    for BENCH_AGG_SECONDS; sustained events/s = accepted events / time until all are in
    usage_records.
(c) Visibility: an open-loop client at ~5,000 events/s (50 requests/s of 100 events); each request
    carries one probe event with a metric of its own, and its latency is the probe row's
    created_at (the aggregator's transaction start, so a few ms early) minus the time the 202
    arrived. p50/p99.
CPU of the aggregator, ingest, Kafka and PostgreSQL is read from /proc for each run.
(d) Where one batch's time goes, in process: Python and each SQL statement (batch_profile.py).
BENCH_AGG_PARTS=bc runs only (b) and (c).
Goals on a 2-core box: >= 30,000 events/s end to end; p99 visibility < 2 s at 5,000 events/s.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa

from shared.db import unit_of_work
from shared.events import Envelope, UsageEvent, encode_envelope
from shared.meters import MeterDefinition, apply_meters
from tests import components
from tests.aggregator_support import AggregatorProcess, Producer, create_topics, wait_for
from tests.bench import figures
from tests.bench.batch_profile import profile_batches
from tests.bench.bench_ingest import (
    bench_database,
    cpu_seconds,
    organization_ids,
    processes,
    run_wrk,
    seed_keys,
)
from tests.ingest_support import run_ingest

ORGANIZATIONS = 1000
PREFILL_EVENTS = int(os.environ.get("BENCH_AGG_PREFILL", "300000"))
SINGLE_EVENTS = int(os.environ.get("BENCH_AGG_SINGLES", "30000"))
STORM_EVENTS = int(os.environ.get("BENCH_AGG_STORM", "50000"))
E2E_SECONDS = float(os.environ.get("BENCH_AGG_SECONDS", "15"))
LATENCY_SECONDS = float(os.environ.get("BENCH_AGG_LATENCY_SECONDS", "20"))
LATENCY_RPS = 50
BATCH_SECONDS = "meterline_aggregator_batch_seconds_sum"
FIGURE_OF_ALONE = {
    (100, 1): "aggregator_events_per_s",
    (100, 2): "aggregator2_events_per_s",
    (1, 1): "aggregator1_events_per_s",
}
FIGURE_OF_E2E = {1: "e2e_events_per_s", 2: "e2e2_events_per_s"}


def counted(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                sa.text("SELECT coalesce(sum(event_count), 0) FROM usage_records")
            ).scalar_one()
        )


def prefill(
    bootstrap: str,
    topic: str,
    orgs: list[uuid.UUID],
    events: int,
    per: int,
    *,
    run: str | None = None,
    quantity: int = 1,
    dimensional: bool = False,
) -> None:
    """`events` events in envelopes of `per`; the same `run` gives the same ids again;
    `dimensional`: the events of METERS (see (a''))."""
    now = datetime.now(UTC)
    producer = Producer(bootstrap)
    run = run or secrets.token_hex(3)
    for n in range(events // per):
        org = orgs[n % len(orgs)]
        batch = [
            UsageEvent(id=f"{run}-{n}-{i}", metric="api_calls", quantity=quantity, timestamp=now)  # type: ignore[arg-type]
            if not dimensional
            else metered_event(f"{run}-{n}-{i}", n * per + i, now)
            for i in range(per)
        ]
        value = encode_envelope(
            Envelope(v=1, organization_id=org, api_key_id=None, received_at=now, events=batch)
        )
        producer.send(topic, org, value)
    producer.flush()
    producer.close()


METERS = [
    MeterDefinition("tokens", "sum", ("model", "type", "region")),
    MeterDefinition("active_users", "unique_count", ("region",), property="user_id"),
]
MODELS = ("small", "medium", "large", "xl")
REGIONS = ("eu", "us", "ap")


def metered_event(event_id: str, n: int, now: datetime) -> UsageEvent:
    if n % 2:
        return UsageEvent(
            id=event_id,
            metric="active_users",
            quantity=Decimal(1),
            timestamp=now,
            properties={"region": REGIONS[n % 3], "user_id": f"user-{n * 7919 % 5000}"},
        )
    return UsageEvent(
        id=event_id,
        metric="tokens",
        quantity=Decimal(n % 1000 + 1),
        timestamp=now,
        properties={
            "model": MODELS[n // 2 % 4],
            "type": ("input", "output")[n // 8 % 2],
            "region": REGIONS[n // 16 % 3],
        },
    )


def topics_created(bootstrap: str, names: list[str]) -> bool:
    try:
        create_topics(bootstrap, names, 4)
    except Exception:
        return False
    return True


def cpu_of(groups: dict[str, list[int]]) -> dict[str, float]:
    return {name: cpu_seconds(pids) for name, pids in groups.items()}


def cpu_report(before: dict[str, float], after: dict[str, float], wall: float) -> str:
    return ", ".join(f"{k} {100 * (after[k] - before[k]) / wall:.0f}%" for k in before)


def groups(
    aggregator: AggregatorProcess | list[AggregatorProcess], ingest_pgrp: int | None = None
) -> dict[str, list[int]]:
    aggregators = aggregator if isinstance(aggregator, list) else [aggregator]
    found = {
        "aggregator": [
            pid for a in aggregators if a.process for pid in processes("pgrp", a.process.pid)
        ],
        "kafka": [int(Path(components.ROOT / ".local" / "kafka.pid").read_text().strip())],
        "postgres": processes("comm", "postgres"),
    }
    if ingest_pgrp is not None:
        found["ingest"] = processes("pgrp", ingest_pgrp)
    return found


def measure_drain(
    engine: sa.Engine, aggregator: list[AggregatorProcess], target: int, label: str
) -> float:
    wait_for(lambda: counted(engine) > 0, timeout=120, interval=0.05, what="the first batch")
    started = time.monotonic()
    first = counted(engine)
    pids = groups(aggregator)
    before = cpu_of(pids)
    batch_before = sum(a.metric(BATCH_SECONDS) for a in aggregator)
    wait_for(lambda: counted(engine) >= target, timeout=600, interval=0.05, what="all events")
    wall = time.monotonic() - started
    batch = sum(a.metric(BATCH_SECONDS) for a in aggregator) - batch_before
    rate = (target - first) / wall
    print(f"  {label}: {rate:,.0f} events/s ({target - first:,} events in {wall:.1f}s)")
    print(f"    cpu: {cpu_report(before, cpu_of(pids), wall)}", flush=True)
    # The rest of each instance's wall time it waited for records (Kafka, Faust's consumer).
    print(f"    in batches: {100 * batch / (wall * len(aggregator)):.0f}% of the wall", flush=True)
    return rate


def bench_alone(
    admin_url: str, env: dict[str, str], tmp: Path, *, only_plain: bool = False
) -> float:
    """The figures of (a); returns the events/s of envelopes of 100 with one instance
    (`only_plain`: that figure alone)."""
    print("(a) aggregator alone, topic pre-filled (4 partitions)", flush=True)
    normal = 0.0
    runs = [(100, PREFILL_EVENTS, 1), (100, PREFILL_EVENTS, 2), (1, SINGLE_EVENTS, 1)]
    for per, total, instances in runs[:1] if only_plain else runs:
        with bench_database(admin_url) as url:
            seed_keys(url, ORGANIZATIONS)
            engine = sa.create_engine(url)
            prefix = f"bench{secrets.token_hex(3)}"
            run_env = {**env, "DATABASE_URL": url, "METERLINE_TOPIC_PREFIX": prefix}
            topic = f"{prefix}.usage.events"
            # Other suites' fault tests may be restarting the broker: wait for it.
            wait_for(
                lambda names=[topic, topic + ".dlq"]: topics_created(  # type: ignore[misc]
                    env["KAFKA_BOOTSTRAP_SERVERS"], names
                ),
                timeout=120,
                interval=1,
                what="the broker",
            )
            aggregators = [
                AggregatorProcess(run_env, tmp / f"alone-{per}-{instances}-{i}.log").start()
                for i in range(instances)
            ]
            try:
                # The group settles before the topic fills, so the join is not measured.
                wait_for(
                    lambda group=aggregators: all(  # type: ignore[misc]
                        (a.health() or {}).get("assigned_partitions") for a in group
                    ),
                    timeout=120,
                    what="every instance to own partitions",
                )
                produce_started = time.monotonic()
                prefill(env["KAFKA_BOOTSTRAP_SERVERS"], topic, organization_ids(engine), total, per)
                print(
                    f"  pre-filled {total:,} events as {total // per:,} messages of {per} "
                    f"in {time.monotonic() - produce_started:.1f}s",
                    flush=True,
                )
                rate = measure_drain(
                    engine,
                    aggregators,
                    total,
                    f"envelopes of {per}, {instances} instance{'s' if instances > 1 else ''}",
                )
                if (per, instances) == (100, 1):
                    normal = rate
                figures.record(**{FIGURE_OF_ALONE[per, instances]: rate})
            finally:
                for aggregator in aggregators:
                    aggregator.stop()
                engine.dispose()
    return normal


def bench_meters(admin_url: str, env: dict[str, str], tmp: Path, normal: float) -> None:
    """(a''): the events/s of metered events, beside (a)'s plain figure."""
    print(
        f"(a'') meters: {PREFILL_EVENTS:,} events, half tokens (sum by model, type, region), "
        "half active_users (unique_count of user_id by region), envelopes of 100, 1 instance",
        flush=True,
    )
    with bench_database(admin_url) as url:
        seed_keys(url, ORGANIZATIONS)
        engine = sa.create_engine(url)
        with unit_of_work(engine) as session:
            apply_meters(session, METERS)
        prefix = f"bench{secrets.token_hex(3)}"
        run_env = {**env, "DATABASE_URL": url, "METERLINE_TOPIC_PREFIX": prefix}
        topic = f"{prefix}.usage.events"
        bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
        wait_for(
            lambda: topics_created(bootstrap, [topic, topic + ".dlq"]),
            timeout=120,
            interval=1,
            what="the broker",
        )
        aggregator = AggregatorProcess(run_env, tmp / "meters.log").start()
        try:
            wait_for(
                lambda: bool((aggregator.health() or {}).get("assigned_partitions")),
                timeout=120,
                what="the aggregator to own partitions",
            )
            prefill(
                bootstrap, topic, organization_ids(engine), PREFILL_EVENTS, 100, dimensional=True
            )
            rate = measure_drain(engine, [aggregator], PREFILL_EVENTS, "metered, envelopes of 100")
            figures.record(metered_events_per_s=rate)
            with engine.connect() as connection:
                windows, values = connection.execute(
                    sa.text(
                        "SELECT (SELECT count(*) FROM meter_windows),"
                        " (SELECT count(*) FROM meter_values)"
                    )
                ).one()
            print(f"    {windows:,} meter windows, {values:,} distinct values written")
            if normal:
                print(
                    f"  dimensional / plain (a) envelopes of 100, 1 instance: {rate / normal:.2f}"
                )
        finally:
            aggregator.stop()
            engine.dispose()


def bench_storm(admin_url: str, env: dict[str, str], tmp: Path, normal: float) -> None:
    print(
        f"(a') {STORM_EVENTS:,} fresh events, then each id again with another quantity "
        f"({STORM_EVENTS:,} conflicting duplicates), envelopes of 100, 1 instance",
        flush=True,
    )
    with bench_database(admin_url) as url:
        seed_keys(url, ORGANIZATIONS)
        engine = sa.create_engine(url)
        prefix = f"bench{secrets.token_hex(3)}"
        run_env = {**env, "DATABASE_URL": url, "METERLINE_TOPIC_PREFIX": prefix}
        topic = f"{prefix}.usage.events"
        bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
        wait_for(
            lambda: topics_created(bootstrap, [topic, topic + ".dlq"]),
            timeout=120,
            interval=1,
            what="the broker",
        )
        aggregator = AggregatorProcess(run_env, tmp / "storm.log").start()
        try:
            wait_for(
                lambda: bool((aggregator.health() or {}).get("assigned_partitions")),
                timeout=120,
                what="the aggregator to own partitions",
            )
            orgs = organization_ids(engine)
            run = secrets.token_hex(3)
            pids = groups(aggregator)

            def phase(quantity: int, done: Callable[[], bool]) -> tuple[float, float, str]:
                """Both phases timed alike: from the first record produced to the last
                processed (wall), and the aggregator's own batch time over the phase."""
                batch_before = aggregator.metric(BATCH_SECONDS)
                cpu_before = cpu_of(pids)
                started = time.monotonic()
                prefill(bootstrap, topic, orgs, STORM_EVENTS, 100, run=run, quantity=quantity)
                wait_for(done, timeout=600, interval=0.05, what="the phase")
                wall = time.monotonic() - started
                batch = aggregator.metric(BATCH_SECONDS) - batch_before
                return wall, batch, cpu_report(cpu_before, cpu_of(pids), wall)

            fresh_wall, fresh_batch, fresh_cpu = phase(1, lambda: counted(engine) >= STORM_EVENTS)
            storm_wall, storm_batch, storm_cpu = phase(
                2,
                lambda: aggregator.metric("meterline_aggregator_conflicts_total") >= STORM_EVENTS,
            )
            assert counted(engine) == STORM_EVENTS, "a conflicting duplicate was counted"
            fresh, storm = STORM_EVENTS / fresh_wall, STORM_EVENTS / storm_wall
            figures.record(storm_fresh_events_per_s=fresh, storm_events_per_s=storm)
            print(
                f"  fresh: {fresh:,.0f} events/s ({fresh_wall:.1f}s; "
                f"{STORM_EVENTS / fresh_batch:,.0f}/s of batch time)"
            )
            print(f"    cpu: {fresh_cpu}")
            print(
                f"  storm: {storm:,.0f} conflicting duplicates/s ({storm_wall:.1f}s, every one "
                f"dead-lettered; {STORM_EVENTS / storm_batch:,.0f}/s of batch time)"
            )
            print(f"    cpu: {storm_cpu}")
            print(
                f"  storm / fresh: {storm / fresh:.2f} (batch time: "
                f"{fresh_batch / storm_batch:.2f}); storm / (a) envelopes of 100, 1 instance: "
                f"{storm / normal:.2f}"
                if normal
                else f"  storm / fresh: {storm / fresh:.2f}",
                flush=True,
            )
        finally:
            aggregator.stop()
            engine.dispose()


def bench_end_to_end(admin_url: str, env: dict[str, str], tmp: Path, instances: int) -> None:
    print(
        f"(b) end to end: ingest (2 workers) -> Kafka -> aggregator ({instances} instances)",
        flush=True,
    )
    with bench_database(admin_url) as url:
        keys = seed_keys(url, ORGANIZATIONS)
        keys_file = tmp / "keys.txt"
        keys_file.write_text("\n".join(keys) + "\n")
        engine = sa.create_engine(url)
        prefix = f"bench{secrets.token_hex(3)}"
        run_env = {**env, "DATABASE_URL": url, "METERLINE_TOPIC_PREFIX": prefix}
        with run_ingest(run_env, tmp / "ingest.log", workers=2) as server:
            aggregators = [
                AggregatorProcess(run_env, tmp / f"e2e-{instances}-{i}.log").start()
                for i in range(instances)
            ]
            try:
                wait_for(
                    lambda: all((a.health() or {}).get("assigned_partitions") for a in aggregators),
                    timeout=120,
                    what="every instance to own partitions",
                )
                from tests.bench.bench_ingest import CpuWatch

                kafka_pid = groups(aggregators)["kafka"][0]
                watch = CpuWatch(server.process.pid, kafka_pid)
                pids = groups(aggregators, server.process.pid)
                before = cpu_of(pids)
                started = time.monotonic()
                result = run_wrk(
                    server.url, keys_file, batch=100, connections=16, seconds=E2E_SECONDS,
                    watch=watch,
                )  # fmt: skip
                sent_for = time.monotonic() - started
                lag_at_end = counted(engine)
                total, last_change = wait_until_stable(engine)
                wall = last_change - started
                print(
                    f"  ingest accepted {result['events_per_s']:,.0f} events/s "
                    f"for {E2E_SECONDS:.0f}s; {total - lag_at_end:,} events were still to "
                    f"aggregate when the load stopped ({sent_for:.0f}s)"
                )
                print(
                    f"  sustained end to end: {total / wall:,.0f} events/s "
                    f"({total:,} events in usage_records {wall:.1f}s after the first request)"
                )
                print(f"    cpu: {cpu_report(before, cpu_of(pids), wall)}", flush=True)
                figures.record(**{FIGURE_OF_E2E[instances]: total / wall})
            finally:
                for aggregator in aggregators:
                    aggregator.stop()
                engine.dispose()


def wait_until_stable(engine: sa.Engine, quiet: float = 15.0) -> tuple[int, float]:
    """The count once it stopped growing for `quiet` seconds, and when it last grew. Long enough
    to sit out a database restart by another suite (the aggregator backs off up to 10 s)."""
    last, last_change = counted(engine), time.monotonic()
    while time.monotonic() - last_change < quiet:
        time.sleep(0.1)
        now = counted(engine)
        if now != last:
            last, last_change = now, time.monotonic()
    return last, last_change


async def open_loop_probes(
    url: str, keys: list[str], seconds: float, requests_per_s: float
) -> dict[str, float]:
    import httpx

    acks: dict[str, float] = {}
    run = secrets.token_hex(3)
    interval = 1 / requests_per_s
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one(n: int) -> None:
            probe = f"probe.{run}.{n}"
            events = [{"id": f"{run}-{n}-{i}", "metric": "api_calls"} for i in range(99)]
            events.append({"id": f"{run}-{n}-probe", "metric": probe})
            try:
                response = await client.post(
                    "/v1/events",
                    json={"events": events},
                    headers={"Authorization": f"Bearer {keys[n % len(keys)]}"},
                )
            except httpx.HTTPError:
                return  # not accepted: no probe to time (the count printed shows how many)
            if response.status_code == 202:
                acks[probe] = time.time()

        tasks = []
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < seconds:
            tasks.append(asyncio.create_task(one(n)))
            n += 1
            await asyncio.sleep(max(0.0, started + n * interval - time.monotonic()))
        await asyncio.gather(*tasks)
    return acks


def bench_latency(admin_url: str, env: dict[str, str], tmp: Path) -> None:
    # Half of the end-to-end maximum this run measured (b), else LATENCY_RPS requests of 100.
    e2e = figures.measured("e2e_events_per_s")
    rate = e2e / 2 / 100 if e2e else LATENCY_RPS
    print(
        f"(c) visibility latency at {rate * 100:,.0f} events/s"
        + (" (half of (b)'s end to end, 1 aggregator)" if e2e else ""),
        flush=True,
    )
    with bench_database(admin_url) as url:
        keys = seed_keys(url, ORGANIZATIONS)
        engine = sa.create_engine(url)
        prefix = f"bench{secrets.token_hex(3)}"
        run_env = {**env, "DATABASE_URL": url, "METERLINE_TOPIC_PREFIX": prefix}
        with run_ingest(run_env, tmp / "ingest-latency.log", workers=2) as server:
            aggregator = AggregatorProcess(run_env, tmp / "latency.log").start()
            try:
                wait_for(lambda: bool(aggregator.health()), timeout=60, what="aggregator up")
                time.sleep(3)
                acks = asyncio.run(open_loop_probes(server.url, keys, LATENCY_SECONDS, rate))
                wait_for(
                    lambda: probes_visible(engine) >= len(acks), timeout=120, what="every probe"
                )
                with engine.connect() as connection:
                    rows = connection.execute(
                        sa.text(
                            "SELECT metric, extract(epoch FROM created_at) FROM usage_records"
                            " WHERE metric LIKE 'probe.%'"
                        )
                    ).all()
            finally:
                aggregator.stop()
                engine.dispose()
    latencies = sorted(
        max(0.0, float(created) - acks[metric]) for metric, created in rows if metric in acks
    )
    p50 = statistics.median(latencies)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(
        f"  {len(latencies)} probes: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms (202 -> row in usage_records)",
        flush=True,
    )
    figures.record(
        visibility_p50_ms=p50 * 1000, visibility_p99_ms=p99 * 1000, visibility_rate=rate * 100
    )


def probes_visible(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                sa.text("SELECT count(*) FROM usage_records WHERE metric LIKE 'probe.%'")
            ).scalar_one()
        )


def main() -> None:
    env = {**os.environ, **components.local_env()}
    env.setdefault("METERLINE_API_KEY_PEPPER", "bench-pepper-" + "x" * 32)
    env["METERLINE_LOG_LEVEL"] = "WARNING"
    admin_url = env["DATABASE_URL"]
    parts = os.environ.get("BENCH_AGG_PARTS", "abcd")  # "m": (a) plain and (a'') meters only
    with tempfile.TemporaryDirectory() as tmp:
        normal = 0.0
        if "a" in parts or "m" in parts:
            normal = bench_alone(admin_url, env, Path(tmp), only_plain="a" not in parts)
            bench_meters(admin_url, env, Path(tmp), normal)
        if "a" in parts:
            bench_storm(admin_url, env, Path(tmp), normal)
        if "b" in parts:
            for instances in (1, 2):
                bench_end_to_end(admin_url, env, Path(tmp), instances)
        if "c" in parts:
            bench_latency(admin_url, env, Path(tmp))
        if "d" in parts:
            profile_batches(admin_url, ORGANIZATIONS)


if __name__ == "__main__":
    main()
