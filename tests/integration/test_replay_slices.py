"""Replay of a range larger than its budget: staged in chunks, rebuilt in many slices, exact
against the raw events, and a live batch during it waits for one slice and counts once."""

from __future__ import annotations

import threading
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.aggregator.batch import SourceRecord
from services.aggregator.replay import ReplayRequest, replay
from services.aggregator.service import BatchApplier
from services.aggregator.topic_reader import InMemoryTopicReader
from shared.events import UsageEvent, window_start
from shared.settings import Settings
from shared.usage_locks import REPLAY_LOCK
from tests.aggregator_support import envelope_bytes, event, make_tenant, totals, windows

NOW = datetime.now(UTC)
BASE = NOW.replace(minute=0, second=0, microsecond=0) - timedelta(hours=30)


class Topic:
    """An in-memory topic of one organization's envelopes, and the windows its first versions
    make (the raw events' truth: the first version of each id read counts, once)."""

    def __init__(self, settings: Settings, organization_id: uuid.UUID) -> None:
        self.reader = InMemoryTopicReader(settings.events_topic, [0, 1])
        self.organization_id = organization_id
        self._window_seconds = settings.window_seconds
        self._first: dict[str, UsageEvent] = {}

    def send(
        self, events: list[UsageEvent], received: datetime, *, partition: int = 0
    ) -> SourceRecord:
        value = envelope_bytes(self.organization_id, events, received_at=received)
        self.reader.append(partition, value, timestamp_ms=int(received.timestamp() * 1000))
        for e in events:
            self._first.setdefault(e.id, e)
        return self.reader.records[partition][-1]

    def expected_windows(self) -> dict[tuple[object, ...], tuple[Decimal, int]]:
        found: dict[tuple[object, ...], list] = defaultdict(lambda: [Decimal(0), 0])
        for e in self._first.values():
            key = (e.project_id, None, e.metric, window_start(e.timestamp, self._window_seconds))
            found[key][0] += e.quantity
            found[key][1] += 1
        return {key: (q, n) for key, (q, n) in found.items()}

    def expected_totals(self) -> tuple[Decimal, int]:
        return sum((e.quantity for e in self._first.values()), Decimal(0)), len(self._first)


def ledger_rows(engine: Engine, organization_id: uuid.UUID) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                sa.text("SELECT count(*) FROM usage_event_ledger WHERE organization_id = :org"),
                {"org": organization_id},
            ).scalar_one()
        )


def small_budget(settings: Settings) -> Settings:
    return settings.model_copy(update={"replay_chunk_records": 7, "replay_slice_events": 60})


def test_replay_beyond_its_budget_is_exact_in_many_slices_and_a_second_run_changes_nothing(
    engine: Engine, settings: Settings
) -> None:
    tenant = make_tenant(engine)
    org, project = tenant.organization_id, tenant.project_ids[0]
    topic = Topic(settings, org)
    step = timedelta(hours=24) / 3000
    applied = []
    for i in range(0, 3000, 10):
        sent = [
            event(
                f"e{j}",
                quantity=j % 5 + 1,
                timestamp=BASE + step * j,
                project_id=project if j % 3 else None,
                metric="api_calls" if j % 4 else "tokens",
            )
            for j in range(i, i + 10)
        ]
        received = BASE + step * (i + 10)
        applied.append(topic.send(sent, received, partition=i // 10 % 2))
        if i % 70 == 0:  # a resend of the same content
            topic.send(sent, received + timedelta(minutes=5), partition=i // 10 % 2)
    # Ids whose first version lies 18 hours after a second one with other content: the slice of
    # the second is rebuilt first and must not count it.
    for j in range(40):
        late = [event(f"x{j}", quantity=7, timestamp=BASE + timedelta(hours=20, seconds=j))]
        early = [event(f"x{j}", quantity=70, timestamp=BASE + timedelta(hours=2, seconds=j))]
        topic.send(late, BASE + timedelta(hours=20, minutes=1))
        topic.send(early, BASE + timedelta(hours=21))
    # A third applied live beforehand; then a window is corrupted and another deleted.
    BatchApplier(engine, settings).apply(applied[:100])
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE usage_records SET quantity = quantity * 3, event_count = 999"
                " WHERE organization_id = :org AND window_start = :w"
            ),
            {"org": org, "w": BASE + timedelta(hours=1)},
        )
        connection.execute(
            sa.text("DELETE FROM usage_records WHERE organization_id = :org AND window_start = :w"),
            {"org": org, "w": BASE + timedelta(hours=5)},
        )
    slices: list[tuple[int, int]] = []
    request = ReplayRequest(BASE, BASE + timedelta(hours=24), org)

    first = replay(
        engine,
        small_budget(settings),
        topic.reader,
        request,
        now=NOW,
        on_slice=lambda done, total: slices.append((done, total)),
    )
    again = replay(engine, small_budget(settings), topic.reader, request, now=NOW)

    assert len(slices) == slices[-1][1] >= 20
    assert windows(engine, org) == topic.expected_windows()
    assert totals(engine, org) == topic.expected_totals() == (Decimal(9280), 3040)
    assert first.events_counted == 3040
    assert first.events_recorded == 3040 - 1000
    assert ledger_rows(engine, org) == 3040
    assert first.records_read == len(topic.reader.records[0]) + len(topic.reader.records[1])
    assert sum(c.events_after for c in first.changes) == 3040
    assert (again.windows_changed, again.events_recorded, again.events_counted) == (0, 0, 3040)
    assert again.meter_windows_changed == again.meter_values_changed == 0


class ArrivingReader(InMemoryTopicReader):
    """An in-memory topic that runs `arrive` each time a replay asks for its end offsets."""

    arrive: Callable[[], None] = staticmethod(lambda: None)

    def end_offsets(self) -> dict[int, int]:
        self.arrive()
        return super().end_offsets()


def replay_lock_held(engine: Engine) -> bool:
    with engine.connect() as connection:
        return bool(
            connection.execute(
                sa.text(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
                    " AND classid = :ns AND objid = :key AND objsubid = 2"
                    " AND mode = 'ExclusiveLock' AND granted)"
                ),
                {"ns": REPLAY_LOCK[0], "key": REPLAY_LOCK[1]},
            ).scalar_one()
        )


def test_a_live_batch_during_a_replay_waits_one_slice_and_counts_once(
    engine: Engine, settings: Settings
) -> None:
    tenant = make_tenant(engine)
    org = tenant.organization_id
    topic = Topic(settings, org)
    topic.reader = ArrivingReader(settings.events_topic, [0, 1])
    step = timedelta(hours=10) / 2000
    for i in range(0, 2000, 20):
        sent = [event(f"e{j}", quantity=2, timestamp=BASE + step * j) for j in range(i, i + 20)]
        topic.send(sent, BASE + step * (i + 20))
    slices_done: list[int] = []
    live: list[threading.Thread] = []

    def arrive_while_the_second_slice_is_locked() -> None:
        if slices_done != [1] or live or not replay_lock_held(engine):
            return
        # Written to the topic while the replay holds the lock for its second slice (window
        # 1), and applied by a live batch, which waits: one event in the first slice (rebuilt
        # already), one in the second, and repeats of events of both.
        record = topic.send(
            [
                event("live-a", quantity=5, timestamp=BASE + timedelta(minutes=1)),
                event("live-b", quantity=11, timestamp=BASE + timedelta(hours=1, minutes=30)),
                event("e7", quantity=2, timestamp=BASE + step * 7),
                event("e250", quantity=2, timestamp=BASE + step * 250),
            ],
            NOW - timedelta(minutes=1),
        )
        batch = threading.Thread(target=BatchApplier(engine, settings).apply, args=([record],))
        batch.start()
        live.append(batch)

    topic.reader.arrive = arrive_while_the_second_slice_is_locked
    finished_by_slice: list[bool] = []

    def between_slices(done: int, total: int) -> None:
        slices_done.append(done)
        if done == 2:
            # The batch waited for the second slice's lock and nothing more.
            live[0].join(timeout=60)
            finished_by_slice.append(not live[0].is_alive() and done < total)

    report = replay(
        engine,
        small_budget(settings),
        topic.reader,
        ReplayRequest(BASE, BASE + timedelta(hours=10), org),
        now=NOW,
        on_slice=between_slices,
    )

    assert finished_by_slice == [True]
    assert totals(engine, org) == topic.expected_totals() == (Decimal(4016), 2002)
    assert windows(engine, org) == topic.expected_windows()
    assert ledger_rows(engine, org) == 2002
    # live-a's slice was rebuilt before it arrived: the live batch added it there alone;
    # live-b was staged under the second slice's lock and counted by the replay.
    assert report.events_counted == 2001
