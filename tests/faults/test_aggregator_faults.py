"""The aggregator under faults, with real processes: SIGKILL, a database restart, a broker restart,
and one of two instances killed. Each ends with exact totals: every distinct event once."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
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

ENVELOPES = 1500
EVENTS_PER_ENVELOPE = 10
# Small batches keep the aggregator busy for several seconds, so each fault lands mid-stream.
SLOW = {"METERLINE_AGGREGATOR_BATCH_MESSAGES": "5", "METERLINE_AGGREGATOR_BATCH_SECONDS": "0.05"}


class Workload:
    """Envelopes for a few organizations, with repeats, produced up front or in two halves."""

    def __init__(self, engine: Engine, service_env: dict[str, str], topic_prefix: str) -> None:
        self.engine = engine
        self.bootstrap = service_env["KAFKA_BOOTSTRAP_SERVERS"]
        self.topic = f"{topic_prefix}.usage.events"
        create_topics(self.bootstrap, [self.topic, f"{topic_prefix}.usage.events.dlq"], 4)
        self.env = {**service_env, "METERLINE_TOPIC_PREFIX": topic_prefix, **SLOW}
        self.tenants: list[Tenant] = [make_tenant(engine, projects=1, keys=1) for _ in range(4)]
        self.expected: dict[object, set[str]] = {t.organization_id: set() for t in self.tenants}
        now = datetime.now(UTC)
        self.values = []
        for n in range(ENVELOPES):
            tenant = self.tenants[n % len(self.tenants)]
            ids = [f"f{n}-{i}" for i in range(EVENTS_PER_ENVELOPE)]
            if n % 7 == 0 and n > 10:
                ids[0] = f"f{n - 8}-0"  # an id an earlier envelope of this organization carried
            events = [
                event(i, timestamp=now - timedelta(seconds=int(i.split("-")[0][1:]))) for i in ids
            ]
            self.values.append(
                (
                    tenant.organization_id,
                    envelope_bytes(
                        tenant.organization_id,
                        events,
                        api_key_id=tenant.key_ids[0],
                        received_at=now,
                    ),
                )
            )
            self.expected[tenant.organization_id].update(ids)
            if n % 11 == 0:
                self.values.append(self.values[-1])  # a whole request published twice

    def produce(self, part: slice = slice(None)) -> None:
        producer = Producer(self.bootstrap)
        try:
            for org, value in self.values[part]:
                producer.send(self.topic, org, value)
            producer.flush()
        finally:
            producer.close()

    def counted(self) -> int:
        return sum(totals(self.engine, t.organization_id)[1] for t in self.tenants)

    def total_expected(self) -> int:
        return sum(len(ids) for ids in self.expected.values())

    def assert_exact(self) -> None:
        for tenant in self.tenants:
            n = len(self.expected[tenant.organization_id])
            assert totals(self.engine, tenant.organization_id) == (Decimal(n), n)

    def wait_until_all_counted(self, timeout: float = 120) -> None:
        wait_for(
            lambda: self.counted() >= self.total_expected(), timeout=timeout, what="every event"
        )
        time.sleep(2)  # anything counted twice would show up now
        self.assert_exact()


def test_sigkill_mid_stream_and_restart_counts_every_event_once(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    work = Workload(engine, service_env, topic_prefix)
    work.produce()
    first = AggregatorProcess(work.env, tmp_path / "first.log").start()
    try:
        wait_for(lambda: work.counted() > work.total_expected() // 4, timeout=90, what="a quarter")
    finally:
        first.kill()
    assert work.counted() < work.total_expected(), "the kill should land mid-stream"

    second = AggregatorProcess(work.env, tmp_path / "second.log").start()
    try:
        work.wait_until_all_counted()
    finally:
        second.stop()


def test_database_restart_while_running_pauses_and_then_counts_every_event_once(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    work = Workload(engine, service_env, topic_prefix)
    work.produce(slice(0, len(work.values) // 2))
    aggregator = AggregatorProcess(work.env, tmp_path / "aggregator.log").start()
    try:
        wait_for(lambda: work.counted() > 1000, timeout=90, what="the first events")
        components.stop("postgres")
        try:
            work.produce(slice(len(work.values) // 2, None))
            time.sleep(3)
            health = aggregator.health()
        finally:
            components.start("postgres")
        engine.dispose()
        work.wait_until_all_counted()
        assert aggregator.process and aggregator.process.poll() is None
    finally:
        aggregator.stop()
    assert health is not None and health["status"] == "waiting_for_database"


def test_broker_restart_while_running_counts_every_event_once(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    work = Workload(engine, service_env, topic_prefix)
    work.produce(slice(0, len(work.values) // 2))
    aggregator = AggregatorProcess(work.env, tmp_path / "aggregator.log").start()
    try:
        wait_for(lambda: work.counted() > 1000, timeout=90, what="the first events")
        components.stop("kafka")
        try:
            time.sleep(2)
        finally:
            components.start("kafka")
        work.produce(slice(len(work.values) // 2, None))
        work.wait_until_all_counted(timeout=180)
        assert aggregator.process and aggregator.process.poll() is None
    finally:
        aggregator.stop()


def test_two_instances_share_partitions_and_one_killed_loses_nothing(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    work = Workload(engine, service_env, topic_prefix)
    one = AggregatorProcess(work.env, tmp_path / "one.log").start()
    two = AggregatorProcess(work.env, tmp_path / "two.log").start()
    try:

        def both_assigned() -> bool:
            a, b = one.health(), two.health()
            return bool(a and b and a["assigned_partitions"] and b["assigned_partitions"])

        wait_for(both_assigned, timeout=90, what="both instances to own partitions")
        shares = (
            (one.health() or {})["assigned_partitions"],
            (two.health() or {})["assigned_partitions"],
        )
        work.produce()
        wait_for(lambda: work.counted() > work.total_expected() // 4, timeout=90, what="a quarter")
        one.kill()
        # A static member's partitions move once its session (60 s) expires, not at the kill.
        wait_for(
            lambda: (two.health() or {}).get("assigned_partitions") == [0, 1, 2, 3],
            timeout=150,
            what="the survivor to take the killed instance's partitions",
        )
        work.wait_until_all_counted(timeout=180)
        after = (two.health() or {})["assigned_partitions"]
    finally:
        one.kill()
        two.stop()
    assert sorted(shares[0] + shares[1]) == [0, 1, 2, 3]
    assert after == [0, 1, 2, 3]


def test_graceful_stop_during_a_database_outage_loses_and_doubles_nothing(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    work = Workload(engine, service_env, topic_prefix)
    first = AggregatorProcess(work.env, tmp_path / "first.log").start()
    try:
        wait_for(lambda: bool((first.health() or {}).get("assigned_partitions")), timeout=90)
        components.stop("postgres")
        try:
            work.produce()
            wait_for(
                lambda: (first.health() or {}).get("status") == "waiting_for_database",
                timeout=60,
                what="the batch to wait for the database",
            )
            first.stop()  # SIGTERM: the pending batch must not be acked on the way out
        finally:
            components.start("postgres")
    finally:
        first.kill()
    engine.dispose()
    # Whether the first instance gave its batch up on the way out (the usual case) or the
    # database came back first (another suite may start it), the totals must end exact.
    second = AggregatorProcess(work.env, tmp_path / "second.log").start()
    try:
        work.wait_until_all_counted()
    finally:
        second.stop()
