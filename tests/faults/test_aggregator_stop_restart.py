"""Stopping and restarting the aggregator with real processes: SIGTERM ends it within 10 s whatever
is pending (a backlog full of conflicting duplicates, dead letters the broker cannot take), and a
SIGKILLed instance restarted at once counts again within 15 s. Each ends with exact totals."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from tests import components
from tests.aggregator_support import (
    AggregatorProcess,
    Producer,
    Tenant,
    create_topics,
    envelope_bytes,
    event,
    make_tenant,
    totals,
    wait_for,
)

pytestmark = pytest.mark.fault

STOP_BOUND_SECONDS = 10.0
RESTART_BOUND_SECONDS = 15.0


class Backlog:
    """Envelopes of 100 events for four organizations; each id is later resent with another
    quantity (a conflicting duplicate, dead-lettered)."""

    def __init__(self, engine: Engine, service_env: dict[str, str], topic_prefix: str) -> None:
        self.engine = engine
        self.bootstrap = service_env["KAFKA_BOOTSTRAP_SERVERS"]
        self.topic = f"{topic_prefix}.usage.events"
        create_topics(self.bootstrap, [self.topic, f"{self.topic}.dlq"], 4)
        self.env = {**service_env, "METERLINE_TOPIC_PREFIX": topic_prefix}
        self.tenants: list[Tenant] = [make_tenant(engine) for _ in range(4)]
        self.produced: dict[object, int] = {t.organization_id: 0 for t in self.tenants}
        self.now = datetime.now(UTC)

    def produce(self, envelopes: int, *, conflicts: bool = True, tag: str = "b") -> None:
        producer = Producer(self.bootstrap)
        try:
            for version in (1, 2) if conflicts else (1,):
                for n in range(envelopes):
                    tenant = self.tenants[n % len(self.tenants)]
                    events = [
                        event(f"{tag}{n}-{i}", quantity=version, timestamp=self.now)
                        for i in range(100)
                    ]
                    value = envelope_bytes(tenant.organization_id, events, received_at=self.now)
                    producer.send(self.topic, tenant.organization_id, value)
                    if version == 1:
                        self.produced[tenant.organization_id] += 100
            producer.flush()
        finally:
            producer.close()

    def counted(self) -> int:
        return sum(totals(self.engine, t.organization_id)[1] for t in self.tenants)

    def wait_exact(self, timeout: float = 180) -> None:
        expected = sum(self.produced.values())
        wait_for(lambda: self.counted() >= expected, timeout=timeout, what="every event")
        time.sleep(2)  # anything counted twice would show up now
        for tenant in self.tenants:
            n = self.produced[tenant.organization_id]
            assert totals(self.engine, tenant.organization_id) == (Decimal(n), n)


def stop_seconds(aggregator: AggregatorProcess) -> float:
    assert aggregator.process is not None
    started = time.monotonic()
    aggregator.process.terminate()
    try:
        aggregator.process.wait(timeout=60)
    finally:
        aggregator.kill()
    return time.monotonic() - started


def test_sigterm_under_a_backlog_full_of_conflicts_stops_within_10s(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    backlog = Backlog(engine, service_env, topic_prefix)
    backlog.produce(1500)  # 150,000 events, then 150,000 conflicting duplicates of them
    first = AggregatorProcess(backlog.env, tmp_path / "first.log").start()
    wait_for(lambda: backlog.counted() > 0, timeout=90, what="the first batch")

    took = stop_seconds(first)
    print(f"SIGTERM under the backlog: exited after {took:.1f}s")

    assert took <= STOP_BOUND_SECONDS
    assert backlog.counted() < sum(backlog.produced.values()), "the stop should land mid-backlog"
    second = AggregatorProcess(backlog.env, tmp_path / "second.log").start()
    try:
        backlog.wait_exact()
    finally:
        second.stop()


def test_sigterm_while_dead_letters_cannot_be_acknowledged_stops_within_10s(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    backlog = Backlog(engine, service_env, topic_prefix)
    backlog.produce(600)
    first = AggregatorProcess(backlog.env, tmp_path / "first.log").start()
    try:
        wait_for(lambda: backlog.counted() > 0, timeout=90, what="the first batch")
        components.stop("kafka")
        try:
            # Whatever the aggregator holds now waits for the broker (its dead letters, its
            # offsets, the next fetch): a stop must not wait with it.
            time.sleep(1)
            took = stop_seconds(first)
            print(f"SIGTERM with the broker down: exited after {took:.1f}s")
        finally:
            components.start("kafka")
    finally:
        first.kill()

    assert took <= STOP_BOUND_SECONDS
    second = AggregatorProcess(backlog.env, tmp_path / "second.log").start()
    try:
        backlog.wait_exact()
    finally:
        second.stop()


def test_sigkilled_aggregator_restarted_at_once_counts_again_within_15s(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    backlog = Backlog(engine, service_env, topic_prefix)
    stop_producing = threading.Event()

    def produce_steadily() -> None:
        n = 0
        while not stop_producing.is_set():
            backlog.produce(4, conflicts=False, tag=f"s{n}-")
            n += 1
            time.sleep(0.1)

    aggregator = AggregatorProcess(backlog.env, tmp_path / "aggregator.log").start()
    producer = threading.Thread(target=produce_steadily)
    producer.start()
    gaps = []
    try:
        wait_for(lambda: backlog.counted() > 1000, timeout=90, what="steady counting")
        for _ in range(2):
            aggregator.kill()
            killed = time.monotonic()
            aggregator.start()  # at once, same host and port: the same static member
            # Counting again: the new process itself has counted new events.
            wait_for(
                lambda: aggregator.metric("meterline_aggregator_events_total") > 0,
                timeout=120,
                interval=0.1,
                what="counting after the restart",
            )
            gaps.append(time.monotonic() - killed)
            time.sleep(2)
        stop_producing.set()
        producer.join(30)
        backlog.wait_exact()
    finally:
        stop_producing.set()
        aggregator.stop()

    print("counting again after SIGKILL + restart: " + ", ".join(f"{g:.1f}s" for g in gaps))
    assert max(gaps) <= RESTART_BOUND_SECONDS, gaps
