"""Replay of a large range against the real broker and database, beside a live aggregator.

A topic pre-filled with BENCH_REPLAY_EVENTS events (default 10,000,000) in envelopes of 100 over
1,000 organizations, their times spread over BENCH_REPLAY_DAYS days (default 28) of hourly
windows; none of them counted yet, so the replay records every one in the ledger (the recovery
case, its most expensive). `meterline replay --json` over the whole range is the real process:
its events/s (wall time of the process), its peak RSS (ru_maxrss of the child, from wait4), and
its slices.

Beside it, a live aggregator on a topic of its own (same database, so the same replay lock)
applies a trickle of one probe event every PROBE_SECONDS; a poller sees each probe's ledger row
appear. A probe's latency is from its send to its row's visibility; the longest during the
replay is how long a live batch waited (goal < 5 s), beside the quiet p50/max before it.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa

from shared.events import Envelope, UsageEvent, encode_envelope
from tests import components
from tests.aggregator_support import AggregatorProcess, Producer, create_topics, wait_for
from tests.bench import figures
from tests.bench.bench_ingest import bench_database, organization_ids, seed_keys

# 10,000,000 (the size) takes about half an hour on 2 cores: BENCH_REPLAY_EVENTS=10000000.
EVENTS = int(os.environ.get("BENCH_REPLAY_EVENTS", "1000000"))
DAYS = int(os.environ.get("BENCH_REPLAY_DAYS", "28"))
PER = 100
ORGANIZATIONS = 1000
PROBE_SECONDS = 0.2
QUIET_SECONDS = 10.0
METERLINE = str(Path(sys.executable).parent / "meterline")


def fill(bootstrap: str, topic: str, orgs: list[uuid.UUID], start: datetime) -> None:
    """EVENTS events in envelopes of PER, in time order over DAYS days from `start`."""
    span = timedelta(days=DAYS) / EVENTS
    now = datetime.now(UTC)
    producer = Producer(bootstrap)
    run = secrets.token_hex(3)
    one = Decimal(1)
    for n in range(EVENTS // PER):
        org = orgs[n % len(orgs)]
        first = n * PER
        batch = [
            UsageEvent(id=f"{run}-{first + i}", metric="api_calls", quantity=one,
                       timestamp=start + span * (first + i))
            for i in range(PER)
        ]  # fmt: skip
        value = encode_envelope(
            Envelope(v=1, organization_id=org, api_key_id=None, received_at=now, events=batch)
        )
        producer.send(topic, org, value)
        if n % 10_000 == 0 and n:
            print(f"  produced {n * PER:,} events", flush=True)
    producer.flush()
    producer.close()


class Probes:
    """One probe event every PROBE_SECONDS to the live aggregator's topic, and when each became
    visible in the ledger."""

    def __init__(self, engine: sa.Engine, bootstrap: str, topic: str, org: uuid.UUID) -> None:
        self._engine = engine
        self._bootstrap = bootstrap
        self._topic = topic
        self._org = org
        self._run = secrets.token_hex(3)
        self.sent: list[float] = []
        self.seen: list[float] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send), threading.Thread(target=self._poll)]

    def start(self) -> Probes:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _send(self) -> None:
        producer = Producer(self._bootstrap)
        n = 0
        while not self._stop.is_set():
            now = datetime.now(UTC)
            probe = UsageEvent(
                id=f"probe-{self._run}-{n}", metric="probe", quantity=Decimal(1), timestamp=now
            )
            value = encode_envelope(
                Envelope(v=1, organization_id=self._org, api_key_id=None, received_at=now,
                         events=[probe])
            )  # fmt: skip
            self.sent.append(time.monotonic())
            producer.send(self._topic, self._org, value)
            producer.flush()
            n += 1
            self._stop.wait(PROBE_SECONDS)
        producer.close()

    def _poll(self) -> None:
        # One organization's probes share a partition, so they are applied in the order sent.
        query = sa.text(
            "SELECT count(*) FROM usage_event_ledger"
            " WHERE organization_id = :org AND event_id LIKE :like"
        )
        with self._engine.connect() as connection:
            while not self._stop.is_set() or len(self.seen) < len(self.sent):
                count = connection.execute(
                    query, {"org": self._org, "like": f"probe-{self._run}-%"}
                ).scalar_one()
                connection.rollback()
                now = time.monotonic()
                while len(self.seen) < count:
                    self.seen.append(now)
                time.sleep(0.02)

    def latencies(self, since: float, until: float) -> list[float]:
        return sorted(
            seen - sent
            for sent, seen in zip(self.sent, self.seen, strict=False)
            if since <= sent < until
        )


def peak_rss_of(command: list[str], env: dict[str, str], out: Path) -> tuple[int, float, int]:
    """Run `command` to its end: (exit status, wall seconds, peak RSS in bytes)."""
    started = time.monotonic()
    with out.open("w") as stdout:
        process = subprocess.Popen(command, env=env, stdout=stdout, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.monotonic() - started, usage.ru_maxrss * 1024


def percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(fraction * len(values)))] if values else float("nan")


def main() -> None:
    env = {**os.environ, **components.local_env()}
    env.setdefault("METERLINE_API_KEY_PEPPER", "bench-pepper-" + "x" * 32)
    env["METERLINE_LOG_LEVEL"] = "WARNING"
    bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = hour - timedelta(days=DAYS)
    print(
        f"replay: {EVENTS:,} events in envelopes of {PER} over {ORGANIZATIONS:,} organizations, "
        f"{DAYS} days of hourly windows, none counted before; a live aggregator beside it",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp, bench_database(env["DATABASE_URL"]) as url:
        seed_keys(url, ORGANIZATIONS)
        engine = sa.create_engine(url)
        replayed, live = f"bench{secrets.token_hex(3)}", f"bench{secrets.token_hex(3)}"
        create_topics(
            bootstrap,
            [f"{p}.usage.events{s}" for p in (replayed, live) for s in ("", ".dlq")],
            partitions=4,
        )
        orgs = organization_ids(engine)
        produced = time.monotonic()
        fill(bootstrap, f"{replayed}.usage.events", orgs, start)
        print(f"  pre-filled in {time.monotonic() - produced:.0f}s", flush=True)
        live_env = {**env, "DATABASE_URL": url, "METERLINE_TOPIC_PREFIX": live}
        aggregator = AggregatorProcess(live_env, Path(tmp) / "live.log").start()
        probes = None
        try:
            wait_for(
                lambda: bool((aggregator.health() or {}).get("assigned_partitions")),
                timeout=120,
                what="the live aggregator to own partitions",
            )
            probes = Probes(engine, bootstrap, f"{live}.usage.events", orgs[0]).start()
            quiet_from = time.monotonic()
            time.sleep(QUIET_SECONDS)
            replay_from = time.monotonic()
            status, wall, rss = peak_rss_of(
                [METERLINE, "replay", "--from", start.isoformat(), "--to", hour.isoformat(),
                 "--json"],
                {**env, "DATABASE_URL": url, "METERLINE_TOPIC_PREFIX": replayed},
                Path(tmp) / "replay.out",
            )  # fmt: skip
            replay_until = time.monotonic()
            time.sleep(2)
        finally:
            if probes:
                probes.stop()
            aggregator.stop()
        output = (Path(tmp) / "replay.out").read_text()
        assert status == 0, output[-2000:]
        report = json.loads(output)
        with engine.connect() as connection:
            counted = connection.execute(
                sa.text("SELECT sum(event_count) FROM usage_records WHERE metric = 'api_calls'")
            ).scalar_one()
        engine.dispose()
    assert report["events_counted"] == counted == EVENTS, (report["events_counted"], counted)
    quiet = probes.latencies(quiet_from, replay_from)
    during = probes.latencies(replay_from, replay_until)
    print(
        f"  replay: {EVENTS / wall:,.0f} events/s ({EVENTS:,} events, {report['records_read']:,} "
        f"records in {wall:.0f}s; {report['slices']} slices, {report['windows_changed']:,} "
        f"windows written), peak RSS {rss / 2**20:,.0f} MiB"
    )
    print(
        f"  live probes, quiet: p50 {percentile(quiet, 0.5):.2f}s max {max(quiet):.2f}s "
        f"({len(quiet)}); during the replay: p50 {percentile(during, 0.5):.2f}s "
        f"p99 {percentile(during, 0.99):.2f}s max {max(during):.2f}s ({len(during)})"
    )
    print(
        f"  longest live wait during the replay / quiet max: {max(during) / max(quiet):.1f}x; "
        f"peak RSS / 1 GiB: {rss / 2**30:.2f}",
        flush=True,
    )
    figures.record(
        replay_events=EVENTS,
        replay_events_per_s=EVENTS / wall,
        replay_peak_rss_mib=rss / 2**20,
        replay_live_wait_max_s=max(during),
    )


if __name__ == "__main__":
    main()
