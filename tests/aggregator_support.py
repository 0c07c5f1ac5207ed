"""Helpers shared by the aggregator and replay tests: build envelopes, produce them, read totals."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.aggregator.batch import SourceRecord
from shared.db import unit_of_work
from shared.events import ENVELOPE_VERSION, Envelope, UsageEvent, encode_envelope
from tests import factories, kafka_support
from tests.kafka_support import free_port

ROOT = Path(__file__).resolve().parent.parent
_offsets = itertools.count()


@dataclass(frozen=True)
class Tenant:
    organization_id: uuid.UUID
    project_ids: list[uuid.UUID]
    key_ids: list[uuid.UUID]


def make_tenant(engine: Engine, *, projects: int = 1, keys: int = 1) -> Tenant:
    """An organization with projects and keys, committed (visible to other processes)."""
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session)
        project_list = [factories.make_project(session, organization) for _ in range(projects)]
        key_list = [factories.make_api_key(session, organization) for _ in range(keys)]
        return Tenant(
            organization.id,
            [p.id for p in project_list],
            [k.key.id for k in key_list],
        )


def event(
    event_id: str,
    *,
    metric: str = "api_calls",
    quantity: str | int = 1,
    timestamp: datetime,
    project_id: uuid.UUID | None = None,
    properties: dict[str, str] | None = None,
    timestamp_defaulted: bool = False,
) -> UsageEvent:
    """An event as ingest puts it in an envelope; `timestamp_defaulted`: the client sent no
    timestamp and `timestamp` is when ingest received it."""
    return UsageEvent(
        id=event_id,
        metric=metric,
        quantity=Decimal(str(quantity)),
        timestamp=timestamp,
        project_id=project_id,
        properties=properties or {},
        timestamp_defaulted=timestamp_defaulted,
    )


def envelope_bytes(
    organization_id: uuid.UUID,
    events: list[UsageEvent],
    *,
    api_key_id: uuid.UUID | None = None,
    received_at: datetime | None = None,
) -> bytes:
    received = received_at or max(e.timestamp for e in events)
    return encode_envelope(
        Envelope(
            v=ENVELOPE_VERSION,
            organization_id=organization_id,
            api_key_id=api_key_id,
            received_at=received,
            events=events,
        )
    )


def record(value: bytes, *, partition: int = 0, key: bytes | None = None) -> SourceRecord:
    return SourceRecord(
        topic="test.usage.events",
        partition=partition,
        offset=next(_offsets),
        timestamp_ms=None,
        key=key,
        value=value,
    )


def totals(
    engine: Engine, organization_id: uuid.UUID, metric: str | None = None
) -> tuple[Decimal, int]:
    """Sum of quantity and event_count over every window of the organization."""
    with engine.connect() as connection:
        row = connection.execute(
            sa.text(
                "SELECT coalesce(sum(quantity), 0), coalesce(sum(event_count), 0)"
                "  FROM usage_records WHERE organization_id = :org"
                "   AND (CAST(:metric AS text) IS NULL OR metric = CAST(:metric AS text))"
            ),
            {"org": organization_id, "metric": metric},
        ).one()
    return Decimal(row[0]), int(row[1])


def windows(engine: Engine, organization_id: uuid.UUID) -> dict[tuple[object, ...], tuple]:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT project_id, api_key_id, metric, window_start, quantity, event_count"
                "  FROM usage_records WHERE organization_id = :org"
            ),
            {"org": organization_id},
        )
        return {(r[0], r[1], r[2], r[3]): (Decimal(r[4]), int(r[5])) for r in rows}


@contextlib.contextmanager
def fresh_database(database_url: str) -> Iterator[Engine]:
    """A database of its own, migrated, for tests that move the ledger's floor (a pruned month
    stays pruned for every later test of the run's shared database)."""
    from sqlalchemy.engine import make_url

    from shared import migrate

    admin = sa.create_engine(make_url(database_url), isolation_level="AUTOCOMMIT")
    name = f"meterline_ledger_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = make_url(database_url).set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)
    engine = sa.create_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --- Kafka ---------------------------------------------------------------------------------------


def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int,
    *,
    replication: int = 1,
    configs: dict[str, str] | None = None,
) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        for name in names:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(
                    [NewTopic(name, partitions, replication, topic_configs=configs or {})]
                )
    finally:
        admin.close()


class Producer:
    """kafka-python producer with acks=all; keys by organization like ingest does. It retries
    (for up to two minutes) through a broker restart or a leader moving, and flush() raises if a
    record was still not acknowledged, so a test never waits for events that were never sent."""

    def __init__(self, bootstrap: str) -> None:
        from kafka import KafkaProducer

        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap.split(","),
            acks="all",
            linger_ms=5,
            delivery_timeout_ms=120_000,
            retry_backoff_ms=200,
        )
        self._pending: list[Any] = []

    def send(self, topic: str, organization_id: uuid.UUID, value: bytes) -> None:
        self._pending.append(
            self._producer.send(topic, key=str(organization_id).encode(), value=value)
        )

    def flush(self) -> None:
        self._producer.flush(timeout=150)
        pending, self._pending = self._pending, []
        for future in pending:
            future.get(timeout=1)  # raises the error of a record that was not acknowledged

    def close(self) -> None:
        self._producer.close(timeout=10)


def read_topic(bootstrap: str, topic: str, timeout: float = 20.0) -> list[tuple[bytes, dict]]:
    """Every record of a topic (value, headers) from the beginning."""
    return [
        (message.value, dict(message.headers or []))
        for message in kafka_support.read_topic(bootstrap, topic, timeout=timeout)
    ]


def dead_letters(bootstrap: str, topic: str) -> list[dict]:
    return [json.loads(value) for value, _ in read_topic(bootstrap, topic)]


# --- Processes ---------------------------------------------------------------------------------


class AggregatorProcess:
    """`meterline aggregate run` as a real process, with its own web port and log file."""

    def __init__(self, env: dict[str, str], log_path: Path, **extra_env: str) -> None:
        self.port = free_port()
        self.env = {**env, "METERLINE_AGGREGATOR_PORT": str(self.port), **extra_env}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> AggregatorProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "meterline"), "aggregate", "run"],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def metric(self, name: str) -> float:
        """A counter of this process's /metrics (0 when it does not answer yet)."""
        import httpx

        try:
            text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2).text
        except httpx.HTTPError:
            return 0.0
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def health(self) -> dict | None:
        import httpx

        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return None


def wait_for(
    condition: Callable[[], bool], *, timeout: float, interval: float = 0.25, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
