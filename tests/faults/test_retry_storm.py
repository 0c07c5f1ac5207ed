"""A retry storm through the real ingest and aggregator, with the aggregator SIGKILLed twice during
it: six clients post 120 batches of 100 events each, ids drawn from one pool of 20,000 (so batches
overlap and resend ids), without timestamps, with stable ones, and mixing both. Every distinct
accepted event is counted exactly once within 60 s of the last 202, and none is a conflict."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Engine

from tests.aggregator_support import AggregatorProcess, dead_letters, totals, wait_for
from tests.ingest_support import Tenant, bearer, make_tenant, rfc3339, run_ingest

pytestmark = pytest.mark.fault

CLIENTS = 6
BATCHES = 120
BATCH_SIZE = 100
POOL = 20_000
BOUND_SECONDS = 60.0
TIMINGS = ("untimed", "timed", "mixed")


def quantity(event_id: int) -> int:
    return event_id % 5 + 1


class Storm:
    """What the clients posted and what ingest accepted, per organization."""

    def __init__(self, tenants: dict[str, Tenant]) -> None:
        self.tenants = tenants
        self.base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
        self.accepted: dict[str, set[int]] = {timing: set() for timing in tenants}
        self.posted: dict[str, int] = dict.fromkeys(tenants, 0)
        self.responses = 0
        self.last_202 = 0.0
        self.retried = 0
        self.lock = threading.Lock()

    def body(self, timing: str, ids: list[int], rng: random.Random) -> dict[str, object]:
        events = []
        for event_id in ids:
            event: dict[str, object] = {
                "id": f"s{event_id}",
                "metric": "api_calls",
                "quantity": quantity(event_id),
            }
            if timing == "timed" or (timing == "mixed" and rng.random() < 0.5):
                # Stable per id: every resend names the same instant.
                event["timestamp"] = rfc3339(self.base + timedelta(seconds=event_id % 7200))
            events.append(event)
        return {"events": events}

    def client(self, url: str, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=30) as http:
            for batch in range(BATCHES):
                timing = TIMINGS[(seed + batch) % len(TIMINGS)]
                ids = rng.sample(range(POOL), BATCH_SIZE)
                body = self.body(timing, ids, rng)
                headers = bearer(self.tenants[timing].key)
                while True:  # a client retries 503/429 with the same ids until accepted
                    response = http.post("/v1/events", json=body, headers=headers)
                    if response.status_code == 202:
                        break
                    assert response.status_code in (429, 503), response.text
                    with self.lock:
                        self.retried += 1
                    time.sleep(0.2)
                with self.lock:
                    self.accepted[timing].update(ids)
                    self.posted[timing] += len(ids)
                    self.responses += 1
                    self.last_202 = time.monotonic()

    def expected(self, timing: str) -> tuple[Decimal, int]:
        ids = self.accepted[timing]
        return Decimal(sum(quantity(i) for i in ids)), len(ids)


def test_retry_storm_with_sigkills_counts_every_accepted_event_once_within_a_minute(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    env = {**service_env, "METERLINE_TOPIC_PREFIX": topic_prefix}
    storm = Storm({timing: make_tenant(engine) for timing in TIMINGS})
    organizations = {t: storm.tenants[t].organization_id for t in TIMINGS}
    counted: Callable[[], dict[str, tuple[Decimal, int]]] = lambda: {  # noqa: E731
        t: totals(engine, org) for t, org in organizations.items()
    }
    with run_ingest(
        env,
        tmp_path / "ingest.log",
        workers=2,
        METERLINE_INGEST_RATE_LIMIT_PER_SECOND="100000",
        METERLINE_INGEST_RATE_LIMIT_BURST="100000",
    ) as server:
        aggregator = AggregatorProcess(env, tmp_path / "aggregator.log").start()
        try:
            wait_for(
                lambda: bool((aggregator.health() or {}).get("assigned_partitions")),
                timeout=90,
                what="the aggregator to own partitions",
            )
            clients = [
                threading.Thread(target=storm.client, args=(server.url, seed))
                for seed in range(CLIENTS)
            ]
            for thread in clients:
                thread.start()
            kills = 0
            for share in (3, 1.5):  # SIGKILL after a third and after two thirds of the batches
                wait_for(
                    lambda share=share: storm.responses >= CLIENTS * BATCHES / share,  # type: ignore[misc]
                    timeout=180,
                    what="the storm to progress",
                )
                if storm.responses < CLIENTS * BATCHES:
                    aggregator.kill()
                    aggregator.start()  # at once, with the same static identity
                    kills += 1
            for thread in clients:
                thread.join(300)
            assert storm.responses == CLIENTS * BATCHES
            assert kills == 2, "the kills should land during the storm"

            expected = {t: storm.expected(t) for t in TIMINGS}
            deadline = storm.last_202 + BOUND_SECONDS
            while time.monotonic() < deadline and counted() != expected:
                time.sleep(0.5)
            exact_after = time.monotonic() - storm.last_202
            print(f"exact {exact_after:.1f}s after the last 202; retried {storm.retried}")
            time.sleep(2)  # anything counted twice would show up now
            final = counted()
        finally:
            aggregator.stop()

    assert final == expected, f"after {exact_after:.1f}s: {final} != {expected}"
    assert exact_after <= BOUND_SECONDS
    # The storm did resend: far more events were accepted than there are distinct ids.
    assert all(storm.posted[t] > 1.5 * expected[t][1] for t in TIMINGS), storm.posted
    conflicts = [
        letter
        for letter in dead_letters(
            env["KAFKA_BOOTSTRAP_SERVERS"], f"{topic_prefix}.usage.events.dlq"
        )
        if letter["code"] == "conflicting_duplicate"
    ]
    assert conflicts == []
