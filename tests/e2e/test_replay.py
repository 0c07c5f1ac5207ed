"""`meterline replay` against the real topic, database and (where it matters) a live aggregator."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared.db import unit_of_work
from shared.models import Organization
from tests.aggregator_support import (
    AggregatorProcess,
    Producer,
    create_topics,
    dead_letters,
    envelope_bytes,
    event,
    make_tenant,
    totals,
    wait_for,
    windows,
)

METERLINE = str(Path(sys.executable).parent / "meterline")


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [METERLINE, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def replay_json(env: dict[str, str], *args: str) -> dict:
    done = run_cli(env, "replay", *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class Stream:
    """A test's own topics, a producer, and the environment pointing processes at them."""

    def __init__(self, service_env: dict[str, str], topic_prefix: str) -> None:
        self.bootstrap = service_env["KAFKA_BOOTSTRAP_SERVERS"]
        self.events_topic = f"{topic_prefix}.usage.events"
        self.dlq_topic = f"{topic_prefix}.usage.events.dlq"
        create_topics(self.bootstrap, [self.events_topic, self.dlq_topic], partitions=4)
        self.env = {**service_env, "METERLINE_TOPIC_PREFIX": topic_prefix}
        self.producer = Producer(self.bootstrap)

    def send(self, organization_id: uuid.UUID, events: list, **kwargs: object) -> None:
        self.producer.send(
            self.events_topic, organization_id, envelope_bytes(organization_id, events, **kwargs)
        )


def hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def test_replay_restores_corrupted_windows_exactly_and_a_second_run_changes_nothing(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    stream = Stream(service_env, topic_prefix)
    tenant = make_tenant(engine, projects=1, keys=1)
    org = tenant.organization_id
    base = hour(datetime.now(UTC)) - timedelta(hours=3)
    sent = [
        event(
            f"r{i}",
            quantity=i % 3 + 1,
            timestamp=base + timedelta(minutes=7 * i),
            project_id=tenant.project_ids[0] if i % 2 else None,
        )
        for i in range(30)
    ]
    for i in range(0, 30, 5):
        stream.send(org, sent[i : i + 5] + sent[i : i + 1], received_at=base + timedelta(hours=4))
    stream.producer.flush()
    aggregator = AggregatorProcess(stream.env, tmp_path / "aggregator.log").start()
    expected = (sum((e.quantity for e in sent), Decimal(0)), len(sent))
    try:
        wait_for(lambda: totals(engine, org) == expected, timeout=60, what="live totals")
    finally:
        aggregator.stop()
    good = windows(engine, org)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE usage_records SET quantity = quantity * 10, event_count = 99"
                " WHERE organization_id = :org AND window_start = :w"
            ),
            {"org": org, "w": base},
        )
        connection.execute(
            sa.text("DELETE FROM usage_records WHERE organization_id = :org AND window_start = :w"),
            {"org": org, "w": base + timedelta(hours=1)},
        )

    first = replay_json(
        stream.env,
        "--from",
        base.isoformat(),
        "--to",
        (base + timedelta(hours=4)).isoformat(),
        "--organization",
        str(org),
    )
    second = replay_json(
        stream.env,
        "--from",
        base.isoformat(),
        "--to",
        (base + timedelta(hours=4)).isoformat(),
        "--organization",
        str(org),
    )

    assert windows(engine, org) == good
    assert first["windows_changed"] >= 2
    assert first["events_counted"] == 30
    assert second["windows_changed"] == 0
    assert totals(engine, org) == expected


def test_replay_rebuilds_the_part_of_a_usage_cut_from_the_events_it_counts(
    engine: Engine, service_env: dict[str, str], topic_prefix: str
) -> None:
    from shared.usage_cuts import Cut, register_cuts, registered_cut_parts

    stream = Stream(service_env, topic_prefix)
    tenant = make_tenant(engine)
    org = tenant.organization_id
    base = hour(datetime.now(UTC)) - timedelta(hours=2)
    cut = Cut(org, base + timedelta(minutes=27, seconds=45))
    with engine.begin() as connection:
        register_cuts(connection, [cut])
    # Nothing applied them live: the cut's part is empty until the replay counts them.
    stream.send(
        org,
        [
            event("c1", quantity=3, timestamp=cut.at - timedelta(seconds=1)),
            event("c2", quantity=5, timestamp=cut.at),
            event("c3", quantity=7, timestamp=base + timedelta(minutes=59, seconds=59)),
        ],
    )
    stream.producer.flush()
    window = ["--from", base.isoformat(), "--to", (base + timedelta(hours=1)).isoformat()]

    report = replay_json(stream.env, *window, "--organization", str(org))

    with engine.connect() as connection:
        _, parts = registered_cut_parts(connection, [cut])
    assert report["events_counted"] == 3
    assert [(p.metric, p.quantity, p.event_count) for p in parts[cut]] == [
        ("api_calls", Decimal(12), 2)
    ]
    assert totals(engine, org) == (Decimal(15), 3)


def test_dry_run_prints_the_changes_and_writes_nothing(
    engine: Engine, service_env: dict[str, str], topic_prefix: str
) -> None:
    stream = Stream(service_env, topic_prefix)
    tenant = make_tenant(engine)
    org = tenant.organization_id
    base = hour(datetime.now(UTC)) - timedelta(hours=2)
    stream.send(org, [event("d1", quantity=4, timestamp=base), event("d2", timestamp=base)])
    stream.producer.flush()

    report = replay_json(
        stream.env,
        "--from",
        base.isoformat(),
        "--to",
        (base + timedelta(hours=1)).isoformat(),
        "--organization",
        str(org),
        "--dry-run",
    )

    assert totals(engine, org) == (Decimal(0), 0)
    assert report["changes"] == [
        {
            "metric": "api_calls",
            "quantity_before": "0",
            "quantity_after": "5",
            "events_before": 0,
            "events_after": 2,
            "windows_changed": 1,
        }
    ]


def test_replay_without_a_live_aggregator_counts_unapplied_events_once_later(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    stream = Stream(service_env, topic_prefix)
    tenant = make_tenant(engine)
    org = tenant.organization_id
    base = hour(datetime.now(UTC)) - timedelta(hours=1)
    stream.send(org, [event(f"u{i}", timestamp=base + timedelta(minutes=i)) for i in range(20)])
    stream.producer.flush()

    replay_json(
        stream.env,
        "--from",
        base.isoformat(),
        "--to",
        (base + timedelta(hours=1)).isoformat(),
        "--organization",
        str(org),
    )
    assert totals(engine, org) == (Decimal(20), 20)
    aggregator = AggregatorProcess(stream.env, tmp_path / "aggregator.log").start()
    try:
        stream.send(org, [event("after", timestamp=base)])
        stream.producer.flush()
        wait_for(lambda: totals(engine, org)[1] >= 21, timeout=60, what="the later event")
    finally:
        aggregator.stop()

    assert totals(engine, org) == (Decimal(21), 21)


def test_replay_while_events_stream_in_neither_loses_nor_double_counts(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    stream = Stream(service_env, topic_prefix)
    tenant = make_tenant(engine)
    org = tenant.organization_id
    now = datetime.now(UTC)
    start = hour(now) - timedelta(hours=2)
    aggregator = AggregatorProcess(stream.env, tmp_path / "aggregator.log").start()
    produced: list = []
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set() or i < 400:
            batch = [
                event(f"s{i + j}", timestamp=start + timedelta(seconds=(i + j) * 13 % 7200))
                for j in range(10)
            ]
            stream.send(org, batch + batch[:2], received_at=datetime.now(UTC))
            produced.extend(batch)
            i += 10
            stream.producer.flush()

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_for(lambda: totals(engine, org)[1] > 50, timeout=60, what="the live aggregator")
        reports = [
            replay_json(
                stream.env,
                "--from",
                start.isoformat(),
                "--to",
                (start + timedelta(hours=2)).isoformat(),
            )
            for _ in range(2)
        ]
        stop.set()
        producer.join()
        expected = (Decimal(len(produced)), len(produced))
        wait_for(lambda: totals(engine, org) == expected, timeout=60, what="every event once")
    finally:
        stop.set()
        producer.join()
        aggregator.stop()

    assert all(r["events_counted"] > 0 for r in reports)
    assert totals(engine, org) == (Decimal(len(produced)), len(produced))


def test_range_older_than_the_ledger_horizon_is_refused_with_one_line(
    service_env: dict[str, str], topic_prefix: str
) -> None:
    stream = Stream(service_env, topic_prefix)
    old = datetime.now(UTC) - timedelta(days=60)

    done = run_cli(
        stream.env,
        "replay",
        "--from",
        old.isoformat(),
        "--to",
        (old + timedelta(hours=1)).isoformat(),
    )

    assert done.returncode == 1
    assert done.stderr.startswith("error: the range starts before the ledger horizon")
    assert "Traceback" not in done.stderr


def test_replay_dlq_republishes_retryable_letters_that_then_count(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    stream = Stream(service_env, topic_prefix)
    missing = uuid.uuid4()
    now = datetime.now(UTC)
    stream.send(missing, [event("late-org", quantity=3, timestamp=now)])
    stream.producer.send(stream.events_topic, missing, b"garbage")
    stream.producer.flush()
    aggregator = AggregatorProcess(stream.env, tmp_path / "aggregator.log").start()
    try:
        wait_for(
            lambda: len(dead_letters(stream.bootstrap, stream.dlq_topic)) >= 2,
            timeout=60,
            what="two dead letters",
        )
        with unit_of_work(engine) as session:
            session.add(Organization(id=missing, name="Late", slug=f"late-{missing.hex[:8]}"))

        dry = run_cli(stream.env, "replay", "dlq", "--dry-run", "--json")
        done = run_cli(stream.env, "replay", "dlq", "--json")
        again = run_cli(stream.env, "replay", "dlq", "--json")
        wait_for(
            lambda: totals(engine, missing) == (Decimal(3), 1),
            timeout=60,
            what="the re-published event",
        )
    finally:
        aggregator.stop()

    assert json.loads(dry.stdout)["republished"] == 1
    assert json.loads(done.stdout) == {
        "dry_run": False,
        "read": 2,
        "republished": 1,
        "skipped": {"malformed": 1},
        "refused": [],
    }
    assert json.loads(again.stdout)["read"] == 0


def test_replay_reports_an_event_postgresql_cannot_store_in_one_line_and_counts_the_rest(
    engine: Engine, service_env: dict[str, str], topic_prefix: str
) -> None:
    """A request accepted before ingest checked text: its NUL id is skipped with one line, every
    other event of it, and of every other tenant, is counted."""
    stream = Stream(service_env, topic_prefix)
    one, two = make_tenant(engine), make_tenant(engine)
    base = hour(datetime.now(UTC)) - timedelta(hours=1)
    stream.send(
        one.organization_id,
        [
            event("n1", timestamp=base),
            event("bad\x00id", quantity=7, timestamp=base),
            event("n2", quantity=2, timestamp=base),
        ],
    )
    stream.send(two.organization_id, [event("t1", quantity=4, timestamp=base)])
    stream.producer.flush()
    window = ["--from", base.isoformat(), "--to", (base + timedelta(hours=1)).isoformat()]

    dry = replay_json(stream.env, *window, "--dry-run")
    done = run_cli(stream.env, "replay", *window)

    assert [s["event_id"] for s in dry["skipped"]] == ["bad\x00id"]
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    [warning] = done.stderr.strip().splitlines()
    assert warning.startswith("warning: skipped event 'bad\\x00id' of organization")
    assert "U+0000" in warning
    assert totals(engine, one.organization_id) == (Decimal(3), 2)
    assert totals(engine, two.organization_id) == (Decimal(4), 1)


def test_replay_dlq_reports_an_unstorable_event_in_one_line_and_republishes_the_rest(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    """A whole request dead-lettered as database_rejected before events were isolated: its
    storable events go back and count, the NUL one is reported once and not re-sent."""
    from services.aggregator.batch import SourceRecord, dead_letter
    from services.aggregator.schemas import dead_letter_messages

    stream = Stream(service_env, topic_prefix)
    tenant = make_tenant(engine)
    org = tenant.organization_id
    now = datetime.now(UTC)
    payload = envelope_bytes(
        org,
        [
            event("d1", timestamp=now),
            event("nul\x00", timestamp=now),
            event("d2", quantity=2, timestamp=now),
        ],
    )
    source = SourceRecord(stream.events_topic, 0, 17, None, str(org).encode(), payload)
    letter = dead_letter(source, "database_rejected", "text fields cannot contain NUL", payload)
    [message] = dead_letter_messages([letter], now)
    stream.producer._producer.send(stream.dlq_topic, key=message.key, value=message.value)
    stream.producer.flush()

    dry = run_cli(stream.env, "replay", "dlq", "--dry-run")
    aggregator = AggregatorProcess(stream.env, tmp_path / "aggregator.log").start()
    try:
        done = run_cli(stream.env, "replay", "dlq", "--json")
        wait_for(lambda: totals(engine, org) == (Decimal(3), 2), timeout=60, what="d1 and d2")
    finally:
        aggregator.stop()

    assert dry.returncode == 0 and "Traceback" not in dry.stderr
    [warning] = dry.stderr.strip().splitlines()
    assert warning.startswith("warning: not re-published: event 'nul\\x00'")
    report = json.loads(done.stdout)
    assert (report["read"], report["republished"]) == (1, 1)
    assert [(r["event_id"], r["reason"][:15]) for r in report["refused"]] == [
        ("nul\x00", "id contains U+0")
    ]
    assert totals(engine, org) == (Decimal(3), 2)
