"""Replay's staging: the records of a range, and an index of their countable events, held in
PostgreSQL instead of the replay's memory, and the slices the range is rebuilt in.

The tables are temporary, the replay connection's own: a replay that crashes leaves no rows
behind, and two replays never see each other's. Records go in by binary COPY, a chunk at a time.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.aggregator.batch import (
    CountableEvent,
    DeadLetter,
    ReadRules,
    SourceRecord,
    read_records,
)

_CREATE = (
    "DROP TABLE IF EXISTS pg_temp.replay_records, pg_temp.replay_events",
    "CREATE TEMPORARY TABLE replay_records ("
    "  seq bigint PRIMARY KEY, partition integer NOT NULL, record_offset bigint NOT NULL,"
    "  timestamp_ms bigint, record_key bytea, value bytea NOT NULL)",
    "CREATE TEMPORARY TABLE replay_events ("
    "  organization_id uuid NOT NULL, event_id text NOT NULL,"
    "  window_start timestamptz NOT NULL, record_seq bigint NOT NULL)",
)
# Built after the first read (COPY into an indexed table is slower); the tails read later
# are small.
_INDEX = (
    "CREATE INDEX ON replay_events (organization_id, event_id)",
    "CREATE INDEX ON replay_events (window_start)",
    "CREATE INDEX ON replay_events (record_seq)",
    "ANALYZE replay_records",
    "ANALYZE replay_events",
)
_COPY_RECORDS = (
    "COPY replay_records (seq, partition, record_offset, timestamp_ms, record_key, value)"
    " FROM STDIN (FORMAT BINARY)"
)
_COPY_EVENTS = (
    "COPY replay_events (organization_id, event_id, window_start, record_seq)"
    " FROM STDIN (FORMAT BINARY)"
)
_SLICE_IDS = (
    "SELECT s.organization_id, s.event_id FROM replay_events AS s"
    " WHERE s.window_start >= :start AND s.window_start < :end"
)
_TAIL_IDS = (
    "SELECT t.organization_id, t.event_id FROM replay_events AS t WHERE t.record_seq > :after"
)


def _records_holding(ids: str) -> sa.TextClause:
    return sa.text(
        "SELECT r.seq, r.partition, r.record_offset, r.timestamp_ms, r.record_key, r.value"  # noqa: S608 - fixed fragments
        "  FROM replay_records AS r"
        " WHERE r.seq IN ("
        "   SELECT e.record_seq FROM replay_events AS e"
        f"    WHERE (e.organization_id, e.event_id) IN ({ids}))"
        " ORDER BY r.seq"
    )


# Every record that holds a version of an event id with a version in the slice: the rules
# need all the versions of an id (the first read wins) wherever their times fall.
_SLICE_RECORDS = _records_holding(_SLICE_IDS)
# The same, for the event ids among them that records staged after :after hold a version of.
_SLICE_RECORDS_SINCE = _records_holding(f"{_SLICE_IDS} INTERSECT {_TAIL_IDS}")


@dataclass(frozen=True, slots=True)
class Staged:
    """What one staging write took in: the records read, the countable events' times, and the
    events PostgreSQL cannot store (never staged: they are reported, not counted)."""

    records: int
    event_times: list[datetime]
    unstorable: list[DeadLetter]


class ReplayStaging:
    """The staged records of one replay, on the replay's connection, in read order (`seq`)."""

    def __init__(
        self,
        connection: Connection,
        topic: str,
        rules: ReadRules,
        organization_id: uuid.UUID | None,
    ) -> None:
        self._connection = connection
        self._topic = topic
        self._rules = rules
        self._organization_id = organization_id
        self._next_seq = 0
        for statement in _CREATE:
            connection.exec_driver_sql(statement)

    def stage(self, records: Sequence[SourceRecord]) -> Staged:
        """Decode the records by the batch's rules and COPY those with countable events of the
        replay's organization (all, without one) into the staging tables."""
        events, letters = read_records(records, self._rules)
        org = self._organization_id
        record_rows: list[tuple[object, ...]] = []
        event_rows: list[tuple[object, ...]] = []
        times: list[datetime] = []
        last: SourceRecord | None = None
        for event in events:
            if org is not None and event.organization_id != org:
                continue
            if event.source is not last:
                last = event.source
                self._next_seq += 1
                record_rows.append(
                    (self._next_seq, last.partition, last.offset, last.timestamp_ms, last.key,
                     last.value)
                )  # fmt: skip
            event_rows.append(
                (event.organization_id, event.event.id, event.window_start, self._next_seq)
            )
            times.append(event.event.timestamp)
        self._copy(_COPY_RECORDS, ["int8", "int4", "int8", "int8", "bytea", "bytea"], record_rows)
        self._copy(_COPY_EVENTS, ["uuid", "text", "timestamptz", "int8"], event_rows)
        unstorable = [
            letter
            for letter in letters
            if letter.code == "unstorable_text"
            and letter.event is not None
            and (org is None or letter.event.organization_id == org)
        ]
        return Staged(len(records), times, unstorable)

    def _copy(self, statement: str, types: list[str], rows: Iterable[tuple[object, ...]]) -> None:
        rows = list(rows)
        if not rows:
            return
        raw = self._connection.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cursor, cursor.copy(statement) as copy:
            copy.set_types(types)
            for row in rows:
                copy.write_row(row)

    def index(self) -> None:
        for statement in _INDEX:
            self._connection.exec_driver_sql(statement)

    def window_counts(self, start: datetime, end: datetime) -> list[tuple[datetime, int]]:
        """Staged events per window of [start, end), in time order."""
        rows = self._connection.execute(
            sa.text(
                "SELECT window_start, count(*) FROM replay_events"
                " WHERE window_start >= :start AND window_start < :end"
                " GROUP BY window_start ORDER BY window_start"
            ),
            {"start": start, "end": end},
        )
        return [(row[0], int(row[1])) for row in rows]

    @property
    def staged(self) -> int:
        """The read order (`seq`) of the last record staged."""
        return self._next_seq

    def slice_events(
        self, start: datetime, end: datetime, *, after: int | None = None
    ) -> list[CountableEvent]:
        """Every staged version, in read order, of each event id with a version in
        [start, end); with `after`, of those ids alone that a record staged after the record
        `after` holds a version of."""
        if after is None:
            rows = self._connection.execute(_SLICE_RECORDS, {"start": start, "end": end})
        else:
            rows = self._connection.execute(
                _SLICE_RECORDS_SINCE, {"start": start, "end": end, "after": after}
            )
        seqs: dict[int, int] = {}
        records = []
        for row in rows:
            record = SourceRecord(
                self._topic, row[1], row[2], row[3], _bytes(row[4]), bytes(row[5])
            )
            seqs[id(record)] = row[0]
            records.append(record)
        events, _ = read_records(records, self._rules)
        org = self._organization_id
        wanted = {
            e.key
            for e in events
            if start <= e.window_start < end and (org is None or e.organization_id == org)
        }
        if after is not None:
            wanted &= {e.key for e in events if seqs[id(e.source)] > after}
        return [e for e in events if e.key in wanted]

    def drop(self) -> None:
        self._connection.exec_driver_sql(_CREATE[0])


def _bytes(value: object) -> bytes | None:
    return None if value is None else bytes(value)  # type: ignore[call-overload]


def plan_slices(
    start: datetime,
    end: datetime,
    counts: Sequence[tuple[datetime, int]],
    most_events: int,
) -> list[tuple[datetime, datetime]]:
    """[start, end) cut at window starts into consecutive slices of at most `most_events`
    staged events each (a window is never cut: one that holds more is a slice alone)."""
    slices: list[tuple[datetime, datetime]] = []
    first, held = start, 0
    for window, count in counts:
        if held and held + count > most_events:
            slices.append((first, window))
            first, held = window, 0
        held += count
    slices.append((first, end))
    return slices
