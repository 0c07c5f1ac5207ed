"""Replay: rebuild the usage_records windows of a time range from the events topic.

Safe while the live aggregator runs, in two phases:
  phase 1  read the topic, without locks, from the offsets of (range start - max future) to the
           end offsets E1 taken at the start (an event's timestamp is at most max_future ahead of
           the record's, so nothing of the range lies before);
  phase 2  one transaction: take the replay lock exclusive (live batches wait), read E1 -> E2 (the
           end offsets now), look the range's event ids up in the ledger, record the events the
           ledger lacks (first accepted wins: an id the ledger holds with other content is not
           counted), and set every window of the range, its meter windows and distinct values
           (shared.meter_usage), and the part of every usage cut inside those windows
           (shared.usage_cuts) and their meter pieces (shared.meter_pieces), to the recomputed
           totals; commit.
Whatever the live aggregator committed is in the ledger and replaced here; whatever it has not yet
applied (before E2) is recorded here and becomes a duplicate there; after E2 it adds as usual.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy.engine import Connection, Engine

from services.aggregator import repository
from services.aggregator.batch import (
    CountableEvent,
    CountedVersion,
    DeadLetter,
    EventKey,
    ReadRules,
    SourceRecord,
    WindowKey,
    WindowTotal,
    counted_version,
    cut_events,
    read_records,
    sum_windows,
    usage_deltas,
    usage_windows,
)
from services.aggregator.ledger_partitions import (
    PartitionKeeper,
    ledger_cutoff,
    ledger_floor,
    months_for,
)
from services.aggregator.meter_windows import meter_usage, piece_events
from services.aggregator.refusals import write_isolating
from services.aggregator.topic_reader import RecordReader
from shared.errors import ConfigurationError, InvalidInput, NotFound
from shared.events import SUM_CONTEXT, stored_text_problem, window_start
from shared.logs import log_event
from shared.meter_pieces import pieces_of, replace_meter_pieces
from shared.meter_usage import (
    delete_meter_values,
    delete_meter_windows,
    insert_meter_values,
    meter_usage_between,
    set_meter_windows,
)
from shared.meters import MeterDefinition, meters_by_metric
from shared.settings import Settings
from shared.topics import retention_message
from shared.usage import delete_usage, set_usage
from shared.usage_cuts import cut_deltas, cuts_between, replace_cut_totals, touch_usage_versions

logger = logging.getLogger("meterline.replay")


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    start: datetime
    end: datetime
    organization_id: uuid.UUID | None = None
    metric: str | None = None
    dry_run: bool = False


@dataclass(slots=True)
class MetricChange:
    metric: str
    quantity_before: Decimal = Decimal(0)
    quantity_after: Decimal = Decimal(0)
    events_before: int = 0
    events_after: int = 0
    windows_changed: int = 0


@dataclass(frozen=True, slots=True)
class SkippedEvent:
    """An event of the range that cannot be counted (its text, or the database, refuses it);
    the replay reports it and goes on with the rest."""

    partition: int
    offset: int
    organization_id: uuid.UUID
    event_id: str
    reason: str

    def line(self) -> str:
        return (
            f"skipped event {self.event_id!r} of organization {self.organization_id} "
            f"(partition {self.partition}, offset {self.offset}): {self.reason}"
        )


@dataclass(slots=True)
class ReplayReport:
    start: datetime
    end: datetime
    organization_id: uuid.UUID | None
    metric: str | None
    dry_run: bool
    records_read: int = 0
    events_counted: int = 0
    events_recorded: int = 0
    changes: list[MetricChange] = field(default_factory=list)
    skipped: list[SkippedEvent] = field(default_factory=list)
    # Meter windows and distinct values (shared.meter_usage) written or deleted.
    meter_windows_changed: int = 0
    meter_values_changed: int = 0

    @property
    def windows_changed(self) -> int:
        return sum(c.windows_changed for c in self.changes)


def aligned_range(start: datetime, end: datetime, window_seconds: int) -> tuple[datetime, datetime]:
    """[start, end) widened to whole windows: a window is rebuilt whole or not at all."""
    if end <= start:
        raise InvalidInput("--to must be after --from")
    try:
        first = window_start(start, window_seconds)
        last = window_start(end - timedelta(microseconds=1), window_seconds)
        return first, last + timedelta(seconds=window_seconds)
    except (OverflowError, ValueError):
        raise InvalidInput(
            "the range is out of range: its windows fall outside the calendar"
        ) from None


class EventVersions:
    """Every distinct version (fingerprint and time) of each event id read, in offset order."""

    def __init__(self, organization_id: uuid.UUID | None) -> None:
        self._organization_id = organization_id
        self.versions: dict[EventKey, list[CountableEvent]] = {}
        # Events whose text PostgreSQL cannot store: never counted, reported if in the range.
        self.unstorable: list[DeadLetter] = []

    def add(self, events: Iterable[CountableEvent]) -> None:
        for event in events:
            if self._organization_id and event.organization_id != self._organization_id:
                continue
            known = self.versions.setdefault(event.key, [])
            version = counted_version(event)
            # Resends that ingest timed share a fingerprint but not a time: each is kept, so
            # that the one the ledger counted (in its own window) is found among them.
            if all(counted_version(v) != version for v in known):
                known.append(event)

    def refuse(self, letters: Iterable[DeadLetter]) -> None:
        for letter in letters:
            event = letter.event
            if letter.code != "unstorable_text" or event is None:
                continue
            if self._organization_id and event.organization_id != self._organization_id:
                continue
            self.unstorable.append(letter)

    def accepted(
        self, recorded: dict[EventKey, CountedVersion]
    ) -> Iterable[tuple[CountableEvent, bool]]:
        """(the accepted version, whether the ledger already holds it) for each id: the very
        version the ledger counted if it has one, else the first read. An id whose counted
        version was not read (its timestamp lies outside what was read) yields nothing."""
        for key, versions in self.versions.items():
            counted = recorded.get(key)
            if counted is None:
                yield versions[0], False
                continue
            for version in versions:
                if counted_version(version) == counted:
                    yield version, True
                    break


def replay(
    engine: Engine,
    settings: Settings,
    reader: RecordReader,
    request: ReplayRequest,
    *,
    now: datetime,
    on_record: Callable[[], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> ReplayReport:
    start, end = aligned_range(request.start, request.end, settings.window_seconds)
    cutoff = ledger_cutoff(now, settings)
    if start < cutoff:
        raise InvalidInput(
            f"the range starts before the ledger horizon ({cutoff.isoformat()}): events that old "
            "are no longer deduplicated, so they cannot be replayed"
        )
    with engine.connect() as connection:
        if request.organization_id and not repository.organization_exists(
            connection, request.organization_id
        ):
            raise NotFound(f"no organization {request.organization_id}")
        _refuse_below_floor(start, ledger_floor(connection))
    rules = ReadRules(
        lateness_horizon=settings.lateness_horizon,
        max_future=timedelta(seconds=settings.max_future_seconds),
        window_seconds=settings.window_seconds,
    )
    read_from = start - rules.max_future
    _refuse_short_retention(reader, settings)
    _refuse_if_not_retained(reader, read_from)
    report = ReplayReport(start, end, request.organization_id, request.metric, request.dry_run)
    versions = EventVersions(request.organization_id)

    # Phase 1: no locks.
    offsets = reader.offsets_since(read_from)
    first_end = reader.end_offsets()
    if on_total:
        on_total(sum(first_end[p] - offsets[p] for p in offsets))
    report.records_read += _read_into(versions, reader, offsets, first_end, rules, on_record)
    # Partitions first: their DDL takes the lock exclusive, so it cannot run under phase 2's.
    PartitionKeeper(engine).ensure(
        months_for(v[0].event.timestamp for v in versions.versions.values())
    )

    # Phase 2: live batches wait from here until the commit.
    with engine.connect() as connection, connection.begin() as transaction:
        repository.lock_exclusive(connection)
        _refuse_below_floor(start, ledger_floor(connection))
        second_end = reader.end_offsets()
        if on_total:
            on_total(sum(second_end[p] - first_end.get(p, 0) for p in second_end))
        report.records_read += _read_into(versions, reader, first_end, second_end, rules, on_record)
        counted, to_record = _accepted_in_range(connection, versions, request, start, end)
        # The ledger rows first, so that an event the database refuses is left out of the
        # windows too (each part in a savepoint: a refusal undoes only its part).
        meters = meters_by_metric(connection)
        recorded = write_isolating(
            to_record,
            lambda part: _record_in_savepoint(connection, part, settings.window_seconds, meters),
        )
        report.skipped = _skipped(versions.unstorable, request, start, end) + [
            _skipped_event(event, reason) for event, reason in recorded.refused
        ]
        counted = _without(counted, {event.key for event, _ in recorded.refused})
        report.events_counted = len(counted)
        before = repository.window_totals(
            connection,
            start=start,
            end=end,
            window_seconds=settings.window_seconds,
            organization_id=request.organization_id,
            metric=request.metric,
        )
        after = sum_windows(counted)
        report.changes = metric_changes(before, after)
        changed = {k: v for k, v in after.items() if before.get(k) != v}
        # Written before a dry run's rollback too: the rollback undoes them with the rest.
        report.meter_windows_changed, report.meter_values_changed = _rebuild_meters(
            connection, counted, request, start, end, settings.window_seconds, meters
        )
        if request.dry_run:
            transaction.rollback()
        else:
            report.events_recorded = sum(recorded.written)
            _set_windows(connection, before, after, changed, settings.window_seconds)
            _rebuild_cuts(connection, counted, request, start, end, settings.window_seconds, meters)
            _record_run(connection, report, now)
            transaction.commit()
    if request.dry_run:
        with engine.begin() as connection:
            _record_run(connection, report, now)
    log_event(
        logger,
        "replay_finished",
        start=start.isoformat(),
        end=end.isoformat(),
        dry_run=request.dry_run,
        records_read=report.records_read,
        events_counted=report.events_counted,
        events_recorded=report.events_recorded,
        windows_changed=report.windows_changed,
        skipped=len(report.skipped),
    )
    return report


def _record_in_savepoint(
    connection: Connection,
    events: Sequence[CountableEvent],
    window_seconds: int,
    meters: Mapping[str, MeterDefinition],
) -> int:
    with connection.begin_nested():
        return repository.record_events(connection, events, window_seconds, meters)


def _skipped(
    letters: Iterable[DeadLetter], request: ReplayRequest, start: datetime, end: datetime
) -> list[SkippedEvent]:
    found = []
    for letter in letters:
        event = letter.event
        assert event is not None
        if not start <= event.event.timestamp < end:
            continue
        if request.metric is not None and event.event.metric != request.metric:
            continue
        found.append(_skipped_event(event, stored_text_problem(event.event) or letter.reason))
    return found


def _skipped_event(event: CountableEvent, reason: str) -> SkippedEvent:
    return SkippedEvent(
        partition=event.source.partition,
        offset=event.source.offset,
        organization_id=event.organization_id,
        event_id=event.event.id,
        reason=reason,
    )


def _without(events: list[CountableEvent], refused: set[EventKey]) -> list[CountableEvent]:
    return [event for event in events if event.key not in refused]


def _set_windows(
    connection: Connection,
    before: Mapping[WindowKey, WindowTotal],
    after: Mapping[WindowKey, WindowTotal],
    changed: Mapping[WindowKey, WindowTotal],
    window_seconds: int,
) -> None:
    """Delete the range's windows that no counted event holds, and set those that changed."""
    delete_usage(connection, usage_windows((k for k in before if k not in after), window_seconds))
    set_usage(connection, usage_deltas(changed, window_seconds))


def _rebuild_meters(
    connection: Connection,
    counted: list[CountableEvent],
    request: ReplayRequest,
    start: datetime,
    end: datetime,
    window_seconds: int,
    meters: Mapping[str, MeterDefinition],
) -> tuple[int, int]:
    """Make the range's meter windows and distinct values those of the counted events (by the
    meters as they are now), writing only what differs: a replay that finds everything right
    writes nothing. Returns how many windows and distinct values it changed."""
    before = meter_usage_between(
        connection,
        start=start,
        end=end,
        window_seconds=window_seconds,
        organization_id=request.organization_id,
        metric=request.metric,
        lock=True,
    )
    after = meter_usage(counted, meters)
    stale = [k for k in before.windows if k not in after.windows]
    changed = [(k, v) for k, v in after.windows.items() if before.windows.get(k) != v]
    delete_meter_windows(connection, stale, window_seconds)
    set_meter_windows(connection, changed, window_seconds)
    delete_meter_values(connection, list(before.values - after.values), window_seconds)
    insert_meter_values(connection, list(after.values - before.values), window_seconds)
    # Meter rows bump no usage version by themselves (usage_records' triggers do): a replay that
    # repairs only them must still make billing re-price the organizations' open periods.
    touch_usage_versions(
        connection,
        {key[0] for key in stale}
        | {key[0] for key, _ in changed}
        | {value[0] for value in before.values ^ after.values},
    )
    return len(stale) + len(changed), len(before.values ^ after.values)


def _rebuild_cuts(
    connection: Connection,
    counted: list[CountableEvent],
    request: ReplayRequest,
    start: datetime,
    end: datetime,
    window_seconds: int,
    meters: Mapping[str, MeterDefinition],
) -> None:
    """Set the parts of the usage cuts inside the rebuilt windows, and the meter pieces of those
    windows, from the same events, so a cut's part stays the part of its window and its pieces
    add up to its meter windows (the range is whole windows: a cut's window is in it or not)."""
    cuts = cuts_between(connection, start, end, request.organization_id)
    replace_cut_totals(
        connection,
        cuts,
        cut_deltas(cut_events(counted), cuts, window_seconds),
        window_seconds=window_seconds,
        metric=request.metric,
    )
    replace_meter_pieces(
        connection,
        cuts,
        pieces_of(piece_events(counted, meters), cuts, window_seconds),
        window_seconds=window_seconds,
        metric=request.metric,
    )
    touch_usage_versions(connection, (cut.organization_id for cut in cuts))


def _refuse_below_floor(start: datetime, floor: datetime | None) -> None:
    if floor is not None and start < floor:
        raise InvalidInput(
            f"the range starts before the ledger floor ({floor.isoformat()}): the ledger "
            "partitions of that time were pruned, so its events cannot be deduplicated"
        )


def _refuse_short_retention(reader: RecordReader, settings: Settings) -> None:
    """A topic that keeps less than the horizon may delete records of a range while it is
    replayed, or already have: the rebuilt windows would then miss events that were counted."""
    problem = reader.retention().problem(settings.lateness_horizon)
    if problem:
        raise ConfigurationError(
            "refusing to replay: " + retention_message(settings, reader.topic, problem)
        )


def _refuse_if_not_retained(reader: RecordReader, read_from: datetime) -> None:
    since_ms = int(read_from.timestamp() * 1000)
    for partition, (offset, timestamp_ms) in reader.oldest_retained().items():
        if timestamp_ms is None or timestamp_ms > since_ms:
            raise InvalidInput(
                f"the topic no longer holds the start of this range: partition {partition} "
                f"starts at offset {offset}"
                + (
                    f" ({datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC).isoformat()})"
                    if timestamp_ms
                    else ""
                )
                + "; pick a later --from"
            )


def _read_into(
    versions: EventVersions,
    reader: RecordReader,
    start: dict[int, int],
    end: dict[int, int],
    rules: ReadRules,
    on_record: Callable[[], None] | None,
) -> int:
    count = 0
    chunk = []
    for record in reader.read(start, end, on_record):
        chunk.append(record)
        count += 1
        if len(chunk) >= 1000:
            _add_read(versions, chunk, rules)
            chunk = []
    _add_read(versions, chunk, rules)
    return count


def _add_read(versions: EventVersions, chunk: list[SourceRecord], rules: ReadRules) -> None:
    events, letters = read_records(chunk, rules)
    versions.add(events)
    versions.refuse(letters)


def _accepted_in_range(
    connection: Connection,
    versions: EventVersions,
    request: ReplayRequest,
    start: datetime,
    end: datetime,
) -> tuple[list[CountableEvent], list[CountableEvent]]:
    """The events that count in the range, and those of them the ledger does not hold yet."""
    in_range = [
        key
        for key, known in versions.versions.items()
        if any(start <= v.event.timestamp < end for v in known)
    ]
    recorded = repository.counted_versions(connection, in_range)
    candidates = EventVersions(None)
    candidates.versions = {key: versions.versions[key] for key in in_range}
    counted: list[CountableEvent] = []
    to_record: list[CountableEvent] = []
    chosen = [
        (event, held)
        for event, held in candidates.accepted(recorded)
        if start <= event.event.timestamp < end
        and (request.metric is None or event.event.metric == request.metric)
    ]
    references = repository.existing_references(connection, [e for e, _ in chosen])
    for event, held in chosen:
        if references.problem(event):
            continue  # the live aggregator dead-letters it; a replay does not count it either
        counted.append(event)
        if not held:
            to_record.append(event)
    return counted, to_record


def metric_changes(
    before: dict[WindowKey, WindowTotal], after: dict[WindowKey, WindowTotal]
) -> list[MetricChange]:
    by_metric: dict[str, MetricChange] = {}
    for key in before.keys() | after.keys():
        change = by_metric.setdefault(key[3], MetricChange(key[3]))
        old, new = before.get(key), after.get(key)
        if old:
            change.quantity_before = SUM_CONTEXT.add(change.quantity_before, old.quantity)
            change.events_before += old.event_count
        if new:
            change.quantity_after = SUM_CONTEXT.add(change.quantity_after, new.quantity)
            change.events_after += new.event_count
        if old != new:
            change.windows_changed += 1
    return sorted(by_metric.values(), key=lambda c: c.metric)


def _record_run(connection: Connection, report: ReplayReport, now: datetime) -> None:
    repository.record_replay_run(
        connection,
        start=report.start,
        end=report.end,
        organization_id=report.organization_id,
        metric=report.metric,
        dry_run=report.dry_run,
        records_read=report.records_read,
        windows_changed=report.windows_changed,
        changes=[change_document(c) for c in report.changes],
        finished_at=now,
    )


def change_document(change: MetricChange) -> dict[str, object]:
    return {
        "metric": change.metric,
        "quantity_before": str(change.quantity_before),
        "quantity_after": str(change.quantity_after),
        "events_before": change.events_before,
        "events_after": change.events_after,
        "windows_changed": change.windows_changed,
    }
