"""A legitimate client's latency while strangers flood ingest with made-up keys.

1. A fresh database with 1,000 organizations and keys; `meterline ingest serve --workers 2`.
2. The legitimate client: tests/bench/wrk/openloop.py, batches of 10 events on 4 real keys at a
   fixed schedule (latency from the scheduled start, so a stall shows).
3. Phases of equal length, in one run: quiet (the client alone); a flood of ~10,000 distinct
   made-up, checksum-valid keys per second from one address (wrk, tests/bench/wrk/strangers.lua);
   quiet; the same flood spread over 10,000 addresses (X-Forwarded-For, which ingest trusts from
   loopback), so that the per-address limit does not stop it and every key is read from the
   database; quiet. The client's quiet p99 is the median of the three quiet phases.
4. Per phase: the client's p50/p99 and statuses, the flood's rate and statuses, the database
   transactions per second and the most connections the service held.
Goal: no 503 for the client and its p99 within 2x of its quiet p99 of the same run.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from shared.keys import generate_key
from tests import components
from tests.bench.bench_ingest import (
    ORGANIZATIONS,
    WRK_DIR,
    CpuWatch,
    bench_database,
    cpu_share,
    delete_topics,
    ensure_wrk,
    seed_keys,
)
from tests.ingest_support import run_ingest

SECONDS = float(os.environ.get("BENCH_STRANGERS_SECONDS", "15"))
FLOOD_RATE = 10_000.0
# Closed-loop connections: from many addresses every made-up key waits for its (batched) read,
# so that flood needs more connections in flight to reach the same rate.
CONNECTIONS = {False: 64, True: 512}
CLIENT_RATE = 200.0
CLIENT_BATCH = 10


class DatabaseWatch:
    """Transactions committed in the bench database, and the most connections it had."""

    def __init__(self, database_url: str) -> None:
        self._engine = sa.create_engine(database_url, pool_size=1, max_overflow=0)
        self._name = make_url(database_url).database
        self.most_connections = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _query(self, sql: str) -> int:
        with self._engine.connect() as connection:
            return int(connection.execute(sa.text(sql), {"db": self._name}).scalar() or 0)

    def transactions(self) -> int:
        return self._query(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :db"
        )

    def start(self) -> None:
        self.most_connections = 0
        self._stop.clear()

        def sample() -> None:
            while not self._stop.wait(0.25):
                connections = self._query(
                    "SELECT count(*) - 1 FROM pg_stat_activity WHERE datname = :db"
                )
                self.most_connections = max(self.most_connections, connections)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def close(self) -> None:
        self._engine.dispose()


def start_client(url: str, keys_file: Path, seconds: float) -> subprocess.Popen[str]:
    command = [
        sys.executable, str(WRK_DIR / "openloop.py"), url, str(keys_file),
        "--rate", f"{CLIENT_RATE:.0f}", "--duration", str(seconds), "--batch", str(CLIENT_BATCH),
        "--connections", "16", "--run-id", f"legit{secrets.token_hex(3)}",
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def start_flood(
    url: str, keys_file: Path, seconds: float, *, spread: bool, delay_ms: float, offset: int
) -> subprocess.Popen[str]:
    """wrk posting the made-up keys from line `offset` on, each once."""
    env = {
        **os.environ,
        "KEYS_FILE": str(keys_file),
        "KEYS_OFFSET": str(offset),
        "SPREAD": "1" if spread else "0",
        "DELAY_MS": f"{delay_ms:.2f}",
    }
    command = [
        "wrk", "-t1", f"-c{CONNECTIONS[spread]}", f"-d{seconds:.0f}s", "--timeout", "10s",
        "-s", str(WRK_DIR / "strangers.lua"), url + "/v1/events",
    ]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)


def result_of(process: subprocess.Popen[str]) -> dict[str, object]:
    output, _ = process.communicate()
    match = re.search(r"^RESULT (.*)$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no RESULT line in:\n{output}")
    result: dict[str, object] = json.loads(match.group(1))
    return result


def flood_rate(result: dict[str, object]) -> float:
    return float(result["requests"]) / (float(result["duration_us"]) / 1e6)  # type: ignore[arg-type]


def calibrate(url: str, keys_file: Path, *, spread: bool, offset: int) -> float:
    """The per-connection pause that gives about FLOOD_RATE requests/s here."""
    connections = CONNECTIONS[spread]
    delay_ms = connections / FLOOD_RATE * 1000
    for attempt in range(3):
        start = offset + attempt * int(FLOOD_RATE * 1.5 * 3)
        flood = start_flood(url, keys_file, 3, spread=spread, delay_ms=delay_ms, offset=start)
        rate = flood_rate(result_of(flood))
        per_request = connections / rate * 1000  # ms a connection spends per request
        delay_ms = max(0.0, delay_ms + connections / FLOOD_RATE * 1000 - per_request)
        if abs(rate - FLOOD_RATE) / FLOOD_RATE < 0.05:
            break
    return delay_ms


def phase(
    name: str,
    url: str,
    client_keys: Path,
    flood_keys: Path | None,
    *,
    spread: bool,
    delay_ms: float,
    offset: int,
    watch: CpuWatch,
    database: DatabaseWatch,
) -> dict[str, object]:
    before_cpu = watch.snapshot()
    before_tx = database.transactions()
    database.start()
    started = time.monotonic()
    flood = (
        start_flood(url, flood_keys, SECONDS + 1, spread=spread, delay_ms=delay_ms, offset=offset)
        if flood_keys
        else None
    )
    client = start_client(url, client_keys, SECONDS)
    legit = result_of(client)
    attack = result_of(flood) if flood else None
    wall = time.monotonic() - started
    database.stop()
    transactions = (database.transactions() - before_tx) / wall
    print(
        f"  {name}: client p50 {legit['p50_ms']:.1f} ms, p99 {legit['p99_ms']:.1f} ms, "
        f"max {legit['max_ms']:.0f} ms, statuses {legit['statuses']}",
        flush=True,
    )
    if attack is not None:
        print(
            f"    flood: {flood_rate(attack):,.0f} made-up keys/s, statuses {attack['statuses']}, "
            f"socket errors {attack['connect_errors']}/{attack['read_errors']}/"
            f"{attack['timeouts']}",
            flush=True,
        )
    print(
        f"    database: {transactions:,.0f} transactions/s, at most "
        f"{database.most_connections} connections",
        flush=True,
    )
    print(f"    CPU (100% = one core): {cpu_share(before_cpu, watch.snapshot(), wall)}", flush=True)
    return {"client": legit, "flood": attack}


def main() -> None:
    ensure_wrk()
    components.up()
    env = components.local_env()
    with bench_database(env["DATABASE_URL"]) as database_url, tempfile.TemporaryDirectory() as tmp:
        keys = seed_keys(database_url, ORGANIZATIONS)
        client_keys = Path(tmp) / "client-keys.txt"
        client_keys.write_text("\n".join(keys[:4]) + "\n")
        # Distinct for the whole run: two calibrations (3 x 3 s each), then each flood its own.
        per_flood = int(FLOOD_RATE * 1.5 * (SECONDS + 2))
        made_up = [
            generate_key().plaintext for _ in range(2 * int(FLOOD_RATE * 1.5 * 9) + 2 * per_flood)
        ]
        flood_keys = Path(tmp) / "made-up-keys.txt"
        flood_keys.write_text("\n".join(made_up) + "\n")
        prefix = f"benchstrangers{secrets.token_hex(3)}"
        service_env = {
            **os.environ,
            **env,
            "DATABASE_URL": database_url,
            "METERLINE_TOPIC_PREFIX": prefix,
            "METERLINE_LOG_LEVEL": "WARNING",
        }
        print(
            f"strangers: ingest with 2 workers; client {CLIENT_RATE:.0f} requests/s of "
            f"{CLIENT_BATCH} events on 4 keys; flood target {FLOOD_RATE:,.0f} made-up keys/s; "
            f"{SECONDS:.0f} s per phase; {os.cpu_count()} cores",
            flush=True,
        )
        database = DatabaseWatch(database_url)
        try:
            with run_ingest(service_env, Path(tmp) / "ingest.log", workers=2) as server:
                kafka_pid = int((components.ROOT / ".local" / "kafka.pid").read_text().strip())
                watch = CpuWatch(server.process.pid, kafka_pid)
                result_of(start_client(server.url, client_keys, 3))  # warm-up: keys cached
                calibration = int(FLOOD_RATE * 1.5 * 9)
                pacing = {
                    spread: calibrate(
                        server.url, flood_keys, spread=spread, offset=spread * calibration
                    )
                    for spread in (False, True)
                }
                print(
                    f"  (flood pacing: {pacing[False]:.2f} ms per connection from one address, "
                    f"{pacing[True]:.2f} ms from many)",
                    flush=True,
                )
                first = 2 * calibration
                quiet: list[dict[str, object]] = []
                floods: dict[str, dict[str, object]] = {}
                for number, (name, spread) in enumerate(
                    (("one address", False), ("10,000 addresses", True))
                ):
                    quiet.append(quiet_phase(server.url, client_keys, watch, database))
                    floods[name] = phase(
                        f"flood from {name}",
                        server.url,
                        client_keys,
                        flood_keys,
                        spread=spread,
                        delay_ms=pacing[spread],
                        offset=first + number * per_flood,
                        watch=watch,
                        database=database,
                    )
                quiet.append(quiet_phase(server.url, client_keys, watch, database))
        finally:
            database.close()
            delete_topics(env["KAFKA_BOOTSTRAP_SERVERS"], prefix)
    quiet_p99 = sorted(float(q["client"]["p99_ms"]) for q in quiet)  # type: ignore[index]
    base = quiet_p99[len(quiet_p99) // 2]
    for name, result in floods.items():
        client: dict[str, object] = result["client"]  # type: ignore[assignment]
        statuses: dict[str, int] = client["statuses"]  # type: ignore[assignment]
        ratio = float(client["p99_ms"]) / base  # type: ignore[arg-type]
        attack: dict[str, object] = result["flood"]  # type: ignore[assignment]
        print(
            f"summary, {flood_rate(attack):,.0f} made-up keys/s from {name}: client p99 "
            f"{client['p99_ms']:.1f} ms = {ratio:.2f}x its quiet p99 (median of "
            f"{', '.join(f'{p:.1f}' for p in quiet_p99)} ms; goal <= 2x); client 503s: "
            f"{statuses.get('503', 0)} (goal 0), non-202: "
            f"{sum(n for s, n in statuses.items() if s != '202')}",
            flush=True,
        )


def quiet_phase(
    url: str, client_keys: Path, watch: CpuWatch, database: DatabaseWatch
) -> dict[str, object]:
    return phase(
        "quiet",
        url,
        client_keys,
        None,
        spread=False,
        delay_ms=0,
        offset=0,
        watch=watch,
        database=database,
    )
