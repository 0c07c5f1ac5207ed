"""Past one broker: the three-node KRaft cluster of `make up` (METERLINE_KAFKA_BROKERS=3), topics
replicated 3 with min.insync.replicas 2. One broker is SIGKILLed while ingest and the aggregator
run under load, then restarted: every 202 is counted exactly once, and ingest answers 503 only
for requests made while a partition of the events topic had no live leader."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Engine

from shared.kafka import create_admin
from shared.settings import load_settings
from tests import components
from tests.aggregator_support import AggregatorProcess, totals, wait_for
from tests.ingest_support import Tenant, bearer, make_tenant, run_ingest

pytestmark = pytest.mark.fault

CLIENTS = 4
PUBLISH_TIMEOUT_SECONDS = 3.0
# A 503 may be answered to a request that began up to this long after the last leader came back:
# the producer learns the new leaders from a metadata refresh.
METADATA_SLACK_SECONDS = 2.0


@pytest.fixture(scope="module")
def cluster(local_env: dict[str, str]) -> Iterator[str]:
    """The three nodes, started (or found running) by deploy/local/ctl.sh; stopped afterwards
    unless the whole suite runs on them."""
    components.start("kafka", brokers=3)
    try:
        yield components.kafka_servers(brokers=3)
    finally:
        for node in (1, 2, 3):
            components.start(f"kafka-{node}", brokers=3)  # none is left dead for what follows
        if local_env.get("METERLINE_KAFKA_BROKERS") != "3":
            components.stop("kafka", brokers=3)


@dataclass
class Load:
    """Clients posting batches of fresh ids, retrying a 503 with the same ids until a 202."""

    url: str
    tenant: Tenant
    accepted: set[str] = field(default_factory=set)
    refused: list[float] = field(default_factory=list)  # monotonic start of each 503'd request
    other: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, n: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            batch = 0
            while not self.stop.is_set():
                ids = [f"c{n}-{batch}-{i}" for i in range(100)]
                body = {"events": [{"id": i, "metric": "api_calls"} for i in ids]}
                while True:
                    started = time.monotonic()
                    response = http.post("/v1/events", json=body, headers=bearer(self.tenant.key))
                    if response.status_code == 202:
                        break
                    with self.lock:
                        if response.status_code == 503:
                            self.refused.append(started)
                        else:
                            self.other.append(response.status_code)
                    time.sleep(0.1)
                with self.lock:
                    self.accepted.update(ids)
                batch += 1
                time.sleep(0.02)


class LeaderWatch:
    """Polls the events topic's partition leaders; records when some partition had none alive."""

    def __init__(self, servers: str, topic: str) -> None:
        self.settings = load_settings(kafka_bootstrap_servers=servers)
        self.topic = topic
        self.dead: int | None = None
        self.leaderless: list[float] = []
        self.stop = threading.Event()

    def leaders(self) -> dict[int, int]:
        admin = create_admin(self.settings, request_timeout_ms=2000)
        try:
            (described,) = admin.describe_topics([self.topic])
        finally:
            admin.close()
        return {p["partition_index"]: p["leader_id"] for p in described["partitions"]}

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                leaders = self.leaders()
            except Exception:  # a node just died: ask again
                continue
            if any(leader < 0 or leader == self.dead for leader in leaders.values()):
                self.leaderless.append(time.monotonic())
            time.sleep(0.2)


def test_one_broker_sigkilled_under_load_loses_nothing_and_503s_only_without_a_leader(
    cluster: str, engine: Engine, service_env: dict[str, str], tmp_path: Path
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    env = {
        **service_env,
        "KAFKA_BOOTSTRAP_SERVERS": cluster,
        "METERLINE_TOPIC_PREFIX": prefix,
        "METERLINE_TOPIC_REPLICATION_FACTOR": "3",
        "METERLINE_TOPIC_MIN_INSYNC_REPLICAS": "2",
    }
    tenant = make_tenant(engine)
    with run_ingest(
        env,
        tmp_path / "ingest.log",
        workers=2,
        METERLINE_INGEST_PUBLISH_TIMEOUT_SECONDS=str(PUBLISH_TIMEOUT_SECONDS),
        METERLINE_INGEST_RATE_LIMIT_PER_SECOND="100000",
        METERLINE_INGEST_RATE_LIMIT_BURST="100000",
    ) as server:
        aggregator = AggregatorProcess(env, tmp_path / "aggregator.log").start()
        load = Load(server.url, tenant)
        watch = LeaderWatch(cluster, f"{prefix}.usage.events")
        threads = [threading.Thread(target=load.client, args=(n,)) for n in range(CLIENTS)]
        threads.append(threading.Thread(target=watch.run))
        try:
            wait_for(
                lambda: bool((aggregator.health() or {}).get("assigned_partitions")),
                timeout=120,
                what="the aggregator to own partitions",
            )
            replicas = watch.leaders()
            assert len(replicas) == 4
            for thread in threads:
                thread.start()
            wait_for(lambda: totals(engine, tenant.organization_id)[1] > 2000, timeout=60)
            # The broker that leads partition 0 of the events topic.
            victim = replicas[0]
            watch.dead = victim
            killed_at = time.monotonic()
            components.kill(f"kafka-{victim}", brokers=3)
            time.sleep(15)
            components.start(f"kafka-{victim}", brokers=3)
            watch.dead = None
            time.sleep(5)
        finally:
            load.stop.set()
            watch.stop.set()
            for thread in threads:
                if thread.is_alive() or thread.ident is not None:
                    thread.join(60)
        try:
            expected = len(load.accepted)
            wait_for(
                lambda: totals(engine, tenant.organization_id)[1] >= expected,
                timeout=120,
                what="every accepted event",
            )
            time.sleep(2)  # anything counted twice would show up now
            final = totals(engine, tenant.organization_id)
        finally:
            aggregator.stop()

    assert final == (Decimal(expected), expected)
    assert load.other == []
    assert watch.leaderless, "the kill should leave partitions without a leader for a while"
    restored = max(watch.leaderless)
    print(
        f"leaderless for {restored - killed_at:.1f}s after the kill; {len(load.refused)} "
        f"requests answered 503, {expected} events accepted"
    )
    for started in load.refused:
        assert killed_at - PUBLISH_TIMEOUT_SECONDS <= started <= restored + METADATA_SLACK_SECONDS
