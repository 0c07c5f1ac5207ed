"""Ingest throughput and latency against the real broker and database, next to Kafka's own ceiling.

1. A fresh database with 1,000 organizations, each with one API key (bulk insert).
2. `meterline ingest serve --workers 2` as a subprocess.
3. wrk (one thread, tests/bench/wrk/ingest.lua) posting batches of 100, then of 1, fresh ids,
   keys rotating: events/s accepted, requests/s, p50/p99 latency.
4. An open-loop generator (tests/bench/wrk/openloop.py) at half the batch-100 request rate: p99
   measured from each request's scheduled start.
5. Kafka's ProducerPerformance with the same record size (acks=all, idempotent): the raw ceiling,
   and the ratio ingest/raw.
CPU seconds of the service, the broker, PostgreSQL and the load generator are read from /proc over
each run. Goal on a 2-core machine: >= 50,000 events/s with batches of 100, p99 < 50 ms at half
that load.
"""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from shared import migrate
from shared.events import Envelope, UsageEvent, encode_envelope
from shared.ids import uuid7
from shared.keys import generate_key, hash_key
from shared.models import ApiKey, Organization
from tests import components, factories
from tests.bench import figures
from tests.ingest_support import run_ingest

ROOT = Path(__file__).resolve().parents[2]
WRK_DIR = Path(__file__).resolve().parent / "wrk"
ORGANIZATIONS = 1000
BATCH_SECONDS = float(os.environ.get("BENCH_INGEST_SECONDS", "15"))
CLK_TCK = os.sysconf("SC_CLK_TCK")


@contextmanager
def bench_database(admin_url: str) -> Iterator[str]:
    admin = make_url(admin_url).set(drivername="postgresql+psycopg")
    name = f"meterline_bench_{secrets.token_hex(4)}"
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = admin.set(database=name).render_as_string(hide_password=False)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        engine.dispose()
        drop_database(admin, name)


def drop_database(admin: sa.URL, name: str) -> None:
    """Drop it, through a PostgreSQL restart (fault tests of others may restart it meanwhile)."""
    for attempt in range(10):
        engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            return
        except (sa.exc.OperationalError, sa.exc.ProgrammingError) as exc:
            # FORCE may not terminate a backend of another role (an autovacuum worker that
            # started on the benchmark's fresh rows): it ends on its own, so try again.
            refused = isinstance(exc.orig, psycopg.errors.InsufficientPrivilege)
            if attempt == 9 or not (refused or isinstance(exc, sa.exc.OperationalError)):
                raise
            time.sleep(2)
        finally:
            engine.dispose()


def organization_ids(engine: sa.Engine) -> list[uuid.UUID]:
    with engine.connect() as connection:
        return list(connection.execute(sa.text("SELECT id FROM organizations")).scalars())


def seed_keys(database_url: str, count: int) -> list[str]:
    """`count` organizations with one key each, in two statements; the keys' plaintexts."""
    run = secrets.token_hex(3)
    organizations = [
        {"id": uuid7(), "name": f"Bench {i}", "slug": f"bench-{run}-{i}"} for i in range(count)
    ]
    keys = [generate_key() for _ in range(count)]
    rows = [
        {
            "id": uuid7(),
            "organization_id": organization["id"],
            "name": "bench",
            "prefix": key.prefix,
            "key_hash": hash_key(key.plaintext, factories.PEPPER),
        }
        for organization, key in zip(organizations, keys, strict=True)
    ]
    engine = sa.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(sa.insert(Organization), organizations)
        connection.execute(sa.insert(ApiKey), rows)
    engine.dispose()
    return [key.plaintext for key in keys]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def processes(predicate: str, value: str | int) -> list[int]:
    """Pids whose process group ('pgrp') or command name ('comm') matches."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        pgrp = int(stat.rsplit(")", 1)[1].split()[2])
        if (predicate == "pgrp" and pgrp == value) or (predicate == "comm" and comm == value):
            found.append(int(entry.name))
    return found


@dataclass
class CpuWatch:
    """CPU seconds of groups of processes between two snapshots. Each group is found anew at each
    snapshot (PostgreSQL starts a backend per connection) and only processes alive at both count;
    `load` is this process's finished children (the load generator, waited for before the end)."""

    ingest_group: int
    kafka_pid: int

    def snapshot(self) -> dict[str, dict[int, float]]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "ingest": per_pid(processes("pgrp", self.ingest_group)),
            "kafka": per_pid([self.kafka_pid]),
            "postgres (all databases)": per_pid(processes("comm", "postgres")),
            "load generator": {0: children.ru_utime + children.ru_stime},
        }


def per_pid(pids: list[int]) -> dict[int, float]:
    return {pid: cpu_seconds([pid]) for pid in pids}


def cpu_share(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], wall: float
) -> str:
    parts = []
    for name, start in before.items():
        used = sum(
            after[name][pid] - seconds for pid, seconds in start.items() if pid in after[name]
        )
        parts.append(f"{name} {100 * used / wall:.0f}%")
    return ", ".join(parts)


def start_profile(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes] | None:
    """py-spy (if installed) sampling one ingest worker, without pausing it."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        print("  (py-spy not installed: no profile)", flush=True)
        return None
    command = [
        py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
        "--nonblocking", "--format", "raw", "--output", str(output),
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


PROFILE_AREAS = [
    ("kafka-python producer", "kafka/"),
    ("uvicorn + httptools", "uvicorn/"),
    ("starlette", "starlette/"),
    ("ingest: validate + envelope", "services/ingest/"),
    ("shared (keys, events, logs)", "shared/"),
    ("prometheus_client", "prometheus_client/"),
    ("sqlalchemy + psycopg", "sqlalchemy/"),
    ("asyncio / uvloop", "asyncio/"),
]


def summarize_profile(path: Path) -> None:
    """Share of samples by area (the innermost frame of ours or a library's decides) and the
    leaf functions that took most."""
    if not path.exists():
        return
    areas: dict[str, int] = {}
    leaves: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + count
        area = "other"
        for frame in reversed(frames):
            found = next((name for name, marker in PROFILE_AREAS if marker in frame), None)
            if found:
                area = found
                break
        areas[area] = areas.get(area, 0) + count
    if not total:
        return
    print("    profile of one ingest worker (share of its samples):", flush=True)
    for name, count in sorted(areas.items(), key=lambda item: -item[1]):
        print(f"      {100 * count / total:5.1f}%  {name}", flush=True)
    print("    top leaf functions:", flush=True)
    for name, count in sorted(leaves.items(), key=lambda item: -item[1])[:8]:
        print(f"      {100 * count / total:5.1f}%  {name[:110]}", flush=True)


def run_wrk(
    url: str,
    keys_file: Path,
    *,
    batch: int,
    connections: int,
    seconds: float,
    watch: CpuWatch,
    profile_pid: int | None = None,
) -> dict[str, float]:
    env = {**os.environ, "BATCH": str(batch), "KEYS_FILE": str(keys_file)}
    env["RUN_ID"] = f"w{batch}-{secrets.token_hex(3)}"
    command = [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--timeout", "10s",
        "-s", str(WRK_DIR / "ingest.lua"), url + "/v1/events",
    ]  # fmt: skip
    profile_path = Path(tempfile.gettempdir()) / f"ingest-profile-{secrets.token_hex(3)}.txt"
    before = watch.snapshot()
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    profiler = start_profile(profile_pid, seconds - 1, profile_path) if profile_pid else None
    output, _ = process.communicate()
    wall = time.monotonic() - started
    after = watch.snapshot()
    if profiler is not None:
        profiler.wait(30)
    match = re.search(r"^RESULT (.*)$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{output}")
    result = json.loads(match.group(1))
    ok = result["requests"] - result["status_errors"] - result["timeouts"]
    duration = result["duration_us"] / 1e6
    summary = {
        "requests_per_s": result["requests"] / duration,
        "events_per_s": ok * batch / duration,
        "errors": result["status_errors"] + result["timeouts"] + result["connect_errors"],
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "max_ms": result["max_us"] / 1000,
    }
    print(
        f"  batch {batch:>3}, {connections} connections, {duration:.0f} s: "
        f"{summary['events_per_s']:,.0f} events/s accepted, "
        f"{summary['requests_per_s']:,.0f} requests/s, p50 {summary['p50_ms']:.1f} ms, "
        f"p99 {summary['p99_ms']:.1f} ms, max {summary['max_ms']:.0f} ms, "
        f"non-202 {summary['errors']}",
        flush=True,
    )
    print(f"    CPU (100% = one core): {cpu_share(before, after, wall)}", flush=True)
    if profiler is not None:
        summarize_profile(profile_path)
        profile_path.unlink(missing_ok=True)
    return summary


def run_open_loop(
    url: str, keys_file: Path, *, batch: int, rate: float, seconds: float, watch: CpuWatch
) -> dict[str, object]:
    command = [
        sys.executable, str(WRK_DIR / "openloop.py"), url, str(keys_file),
        "--rate", f"{rate:.1f}", "--duration", str(seconds), "--batch", str(batch),
        "--connections", "64", "--run-id", f"o{secrets.token_hex(3)}",
    ]  # fmt: skip
    before = watch.snapshot()
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    output, _ = process.communicate()
    wall = time.monotonic() - started
    after = watch.snapshot()
    match = re.search(r"^RESULT (.*)$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"open-loop generator printed no result:\n{output}")
    result: dict[str, object] = json.loads(match.group(1))
    print(
        f"  open loop, batch {batch}, {rate:,.0f} requests/s scheduled "
        f"({rate * batch:,.0f} events/s): achieved {result['achieved_rps']:,.0f} requests/s, "
        f"p50 {result['p50_ms']:.1f} ms, p90 {result['p90_ms']:.1f} ms, "
        f"p99 {result['p99_ms']:.1f} ms, max {result['max_ms']:.0f} ms, "
        f"statuses {result['statuses']}",
        flush=True,
    )
    print(f"    CPU (100% = one core): {cpu_share(before, after, wall)}", flush=True)
    return result


def envelope_size(batch: int) -> int:
    """Bytes of the envelope ingest publishes for one request of `batch` bench events."""
    from datetime import UTC, datetime
    from decimal import Decimal

    now = datetime.now(UTC)
    events = [
        UsageEvent(
            id=f"w100-abcdef-1-{10_000 + i}-{i}",
            metric="api_calls",
            quantity=Decimal(1),
            timestamp=now,
            properties={"region": "eu"},
        )
        for i in range(batch)
    ]
    return len(
        encode_envelope(
            Envelope(
                v=1, organization_id=uuid7(), api_key_id=uuid7(), received_at=now, events=events
            )
        )
    )


def kafka_ceiling(env: dict[str, str], topic_prefix: str, record_size: int) -> dict[str, float]:
    """Kafka's ProducerPerformance: records/s of `record_size` with ingest's producer settings."""
    from kafka.admin import KafkaAdminClient

    libs = env.get("METERLINE_KAFKA_LIBS") or str(
        Path(os.environ.get("METERLINE_CACHE", Path.home() / ".cache" / "meterline"))
        / "kafka-3.9.2"
        / "libs"
    )
    bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
    topic = f"{topic_prefix}.bench.raw"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        admin.create_topics({topic: {"num_partitions": 4, "replication_factor": -1}})
    finally:
        admin.close()
    records = int(os.environ.get("BENCH_RAW_RECORDS", "15000"))
    command = [
        shutil.which("java") or "java", "-Xmx512m", "-cp", f"{libs}/*",
        "org.apache.kafka.tools.ProducerPerformance",
        "--topic", topic, "--num-records", str(records), "--record-size", str(record_size),
        "--throughput", "-1", "--producer-props", f"bootstrap.servers={bootstrap}", "acks=all",
        "enable.idempotence=true", "linger.ms=2", f"batch.size={256 * 1024}",
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = output.strip().splitlines()[-1]
    match = re.search(
        r"([\d.]+) records/sec \(([\d.]+) MB/sec\), ([\d.]+) ms avg latency.*?"
        r"(\d+) ms 50th, (\d+) ms 95th, (\d+) ms 99th",
        line,
    )
    if match is None:
        raise RuntimeError(f"unexpected ProducerPerformance output:\n{output}")
    result = {
        "records_per_s": float(match.group(1)),
        "mb_per_s": float(match.group(2)),
        "p50_ms": float(match.group(4)),
        "p99_ms": float(match.group(6)),
    }
    print(
        f"  Kafka ProducerPerformance, {records} records of {record_size} bytes: "
        f"{result['records_per_s']:,.0f} records/s ({result['mb_per_s']:.1f} MB/s), "
        f"p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms",
        flush=True,
    )
    return result


def ensure_wrk() -> None:
    """wrk comes from Debian's packages; install it where we may (root), else say how."""
    if shutil.which("wrk"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False)
    if not shutil.which("wrk"):
        raise RuntimeError("wrk is not installed: `apt-get install -y wrk`")


def delete_topics(bootstrap: str, prefix: str) -> None:
    """The benchmark's topics hold hundreds of megabytes: drop them."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        mine = [t for t in admin.list_topics() if t.startswith(prefix + ".")]
        if mine:
            admin.delete_topics(mine)
    finally:
        admin.close()


def main() -> None:
    ensure_wrk()
    components.up()
    env = components.local_env()
    workers = int(os.environ.get("BENCH_INGEST_WORKERS", "2"))
    with bench_database(env["DATABASE_URL"]) as database_url, tempfile.TemporaryDirectory() as tmp:
        keys = seed_keys(database_url, ORGANIZATIONS)
        keys_file = Path(tmp) / "keys.txt"
        keys_file.write_text("\n".join(keys) + "\n")
        prefix = f"benchingest{secrets.token_hex(3)}"
        service_env = {
            **os.environ,
            **env,
            "DATABASE_URL": database_url,
            "METERLINE_TOPIC_PREFIX": prefix,
            "METERLINE_LOG_LEVEL": "WARNING",
            "METERLINE_INGEST_RATE_LIMIT_PER_SECOND": "1000000",
            "METERLINE_INGEST_RATE_LIMIT_BURST": "1000000",
        }
        print(
            f"ingest: {workers} workers, {ORGANIZATIONS} organizations/keys, "
            f"{os.cpu_count()} cores",
            flush=True,
        )
        with run_ingest(service_env, Path(tmp) / "ingest.log", workers=workers) as server:
            kafka_pid = int((ROOT / ".local" / "kafka.pid").read_text().strip())
            watch = CpuWatch(server.process.pid, kafka_pid)
            # Warm-up: cheap requests until every key is cached in every worker (each worker
            # verifies each of the 1,000 keys once), topic metadata and connections in place.
            warmed = 0.0
            for _ in range(6):
                warm = run_wrk(
                    server.url, keys_file, batch=1, connections=32, seconds=4, watch=watch
                )
                warmed += warm["requests_per_s"] * 4
                if warmed >= 6 * ORGANIZATIONS:
                    break
            print("measured:", flush=True)
            worker = max(processes("pgrp", server.process.pid))  # the last started: a worker
            batch100 = run_wrk(
                server.url,
                keys_file,
                batch=100,
                connections=32,
                seconds=BATCH_SECONDS,
                watch=watch,
                profile_pid=worker,
            )
            batch1 = run_wrk(
                server.url, keys_file, batch=1, connections=32, seconds=BATCH_SECONDS, watch=watch
            )
            # "Half load": half the goal (25,000 events/s), then half of what was reached.
            half = run_open_loop(
                server.url, keys_file, batch=100, rate=250, seconds=BATCH_SECONDS, watch=watch
            )
            half_max = run_open_loop(
                server.url,
                keys_file,
                batch=100,
                rate=batch100["requests_per_s"] / 2,
                seconds=BATCH_SECONDS,
                watch=watch,
            )
        size = envelope_size(100)
        try:
            raw = kafka_ceiling(env, prefix, size)
        finally:
            delete_topics(env["KAFKA_BOOTSTRAP_SERVERS"], prefix)
    ratio = batch100["requests_per_s"] / raw["records_per_s"]
    figures.record(
        ingest_events_per_s=batch100["events_per_s"],
        ingest_requests_per_s=batch100["requests_per_s"],
        ingest1_events_per_s=batch1["events_per_s"],
        ingest_openloop_rate=batch100["events_per_s"] / 2,
        ingest_openloop_p99_ms=float(half_max["p99_ms"]),  # type: ignore[arg-type]
        raw_producer_records_per_s=raw["records_per_s"],
    )
    print(
        f"summary: {batch100['events_per_s']:,.0f} events/s accepted with batches of 100 "
        f"(goal 50,000); p99 {half['p99_ms']:.1f} ms at 25,000 events/s (goal < 50 ms); "
        f"ingest/raw Kafka = {ratio:.2f} ({batch100['requests_per_s']:,.0f} vs "
        f"{raw['records_per_s']:,.0f} messages/s of {size} bytes)",
        flush=True,
    )


if __name__ == "__main__":
    main()
