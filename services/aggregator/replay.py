"""Replay: rebuild the usage_records windows of a time range from the events topic.

Safe while the live aggregator runs, in bounded memory, in two phases:
  phase 1  read the topic, without locks, from the offsets of (range start - max future) to the
           end offsets taken at the start (an event's timestamp is at most max_future ahead of
           the record's, so nothing of the range lies before), staging the records in
           PostgreSQL (services.aggregator.replay_staging) a chunk at a time;
  phase 2  cut the range into slices of whole windows of at most replay_slice_events staged
           events, and rebuild each in its own transaction: stage the tail written since, take
           the replay lock exclusive (live batches wait for this slice alone), stage the tail
           again up to the end offsets now, look the slice's event ids up in the ledger, record
           the events the ledger lacks (first accepted wins: an id the ledger holds with other
           content is not counted), and set every window of the slice, its meter windows and
           distinct values (shared.meter_usage), and the part of every usage cut inside those
           windows (shared.usage_cuts) and their meter pieces (shared.meter_pieces), to the
           recomputed totals; commit.
Whatever the live aggregator committed is in the ledger and replaced here; whatever it has not yet
applied (before the slice's end offsets) is recorded here and becomes a duplicate there; after
them it adds as usual. An event id's accepted version is decided over all its staged versions
(the first read, or the one the ledger holds), so slices agree on it: it counts in the one slice
that holds its accepted version's window. A replay stopped midway leaves its finished slices
rebuilt and the rest as they were; running it again completes it.
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
from services.aggregator.meter_windows import batch_meter_facts, meter_usage, piece_events
from services.aggregator.refusals import write_isolating
from services.aggregator.replay_staging import ReplayStaging, plan_slices
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
from shared.usage_locks import hold_for_rebuild, release_rebuild

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
    # The slices the range was rebuilt in, each in its own transaction under the replay lock.
    slices: int = 0

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
    on_slice: Callable[[int, int], None] | None = None,
) -> ReplayReport:
    """`on_record` is called per record read, `on_total` with each addition to the records to
    read, `on_slice` with (slices done, slices) after each slice."""
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
    with engine.connect() as connection:
        with connection.begin():
            staging = ReplayStaging(connection, reader.topic, rules, request.organization_id)
        try:
            run = _StagedRun(engine, connection, staging, settings, reader, request, report)
            run.on_record, run.on_total = on_record, on_total
            # Phase 1: no locks.
            run.read_to(reader.offsets_since(read_from), reader.end_offsets())
            with connection.begin():
                staging.index()
                counts = staging.window_counts(start, end)
            slices = plan_slices(start, end, counts, settings.replay_slice_events)
            # Phase 2: live batches wait for one slice at a time; billing does not read the
            # range half rebuilt (a dry run changes nothing, so billing may read meanwhile).
            if not request.dry_run:
                with connection.begin():
                    hold_for_rebuild(connection)
            for done, (first, last) in enumerate(slices, 1):
                run.rebuild_slice(first, last)
                report.slices = done
                if on_slice:
                    on_slice(done, len(slices))
            if not request.dry_run:
                with connection.begin():
                    release_rebuild(connection)
        except BaseException:
            # A failed replay's connection is closed, not pooled: its staging goes with it.
            connection.invalidate()
            raise
        with connection.begin():
            staging.drop()
    report.skipped = run.unstorable + report.skipped
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
        slices=report.slices,
    )
    return report


class _StagedRun:
    """One replay's reads into staging and its slices, adding up into its report."""

    def __init__(
        self,
        engine: Engine,
        connection: Connection,
        staging: ReplayStaging,
        settings: Settings,
        reader: RecordReader,
        request: ReplayRequest,
        report: ReplayReport,
    ) -> None:
        self._engine = engine
        self._connection = connection
        self._staging = staging
        self._settings = settings
        self._reader = reader
        self._request = request
        self._report = report
        self._read_end: dict[int, int] = {}
        self._months: set[datetime] = set()
        self._ensured: set[datetime] = set()
        self.unstorable: list[SkippedEvent] = []
        self.on_record: Callable[[], None] | None = None
        self.on_total: Callable[[int], None] | None = None

    def read_to(self, since: dict[int, int], until: dict[int, int], *, commit: bool = True) -> None:
        """Stage the records in [since, until) a chunk at a time; outside a slice each chunk is
        committed (no long transaction holds back vacuum)."""
        if self.on_total:
            self.on_total(sum(until[p] - since.get(p, 0) for p in until))
        chunk: list[SourceRecord] = []
        records = self._reader.read(since, until, self.on_record)
        for record in records:
            chunk.append(record)
            if len(chunk) >= self._settings.replay_chunk_records:
                self._stage(chunk, commit)
                chunk = []
        self._stage(chunk, commit)
        self._read_end = dict(until)

    def _stage(self, chunk: list[SourceRecord], commit: bool) -> None:
        if not chunk:
            return
        if commit:
            with self._connection.begin():
                staged = self._staging.stage(chunk)
        else:
            staged = self._staging.stage(chunk)
        self._report.records_read += staged.records
        report = self._report
        self._months |= months_for(t for t in staged.event_times if report.start <= t < report.end)
        self.unstorable += _skipped(staged.unstorable, self._request, report.start, report.end)

    def rebuild_slice(self, first: datetime, last: datetime) -> None:
        """Catch up with the topic, then rebuild [first, last) in one transaction under the
        replay lock: under it, every event a live batch has committed was read from below the
        end offsets read after taking it, so the slice's ledger and windows are exact."""
        self.read_to(self._read_end, self._reader.end_offsets())
        # Partitions first: their DDL takes the lock exclusive, so it cannot run under ours.
        if self._months - self._ensured:
            PartitionKeeper(self._engine).ensure(self._months)
            self._ensured |= self._months
        connection = self._connection
        # The slice's staged versions are read and decoded before the lock; under it, only
        # the ids that the records staged since hold a version of are read again.
        with connection.begin():
            events = self._staging.slice_events(first, last)
        staged = self._staging.staged
        with connection.begin():
            repository.lock_exclusive(connection)
            _refuse_below_floor(self._report.start, ledger_floor(connection))
            self.read_to(self._read_end, self._reader.end_offsets(), commit=False)
            if self._staging.staged > staged:
                events = _with_versions(
                    events, self._staging.slice_events(first, last, after=staged)
                )
            # A savepoint: a dry run undoes the slice's writes and keeps what it staged.
            with connection.begin_nested() as work:
                _rebuild(
                    connection,
                    events,
                    self._request,
                    first,
                    last,
                    self._settings.window_seconds,
                    self._report,
                )
                if self._request.dry_run:
                    work.rollback()


def _with_versions(
    events: list[CountableEvent], again: list[CountableEvent]
) -> list[CountableEvent]:
    """`events` with every version of the ids `again` holds replaced by `again`'s (all their
    versions, in read order)."""
    replaced = {e.key for e in again}
    return [e for e in events if e.key not in replaced] + again


def _rebuild(
    connection: Connection,
    events: list[CountableEvent],
    request: ReplayRequest,
    start: datetime,
    end: datetime,
    window_seconds: int,
    report: ReplayReport,
) -> None:
    """Make the windows, meters and cuts of [start, end) those of its accepted events, recording
    in the ledger those it lacks, and add what changed to the report."""
    versions = EventVersions(request.organization_id)
    versions.add(events)
    counted, to_record = _accepted_in_range(connection, versions, request, start, end)
    # The ledger rows first, so that an event the database refuses is left out of the
    # windows too (each part in a savepoint: a refusal undoes only its part).
    meters = meters_by_metric(connection)
    recorded = write_isolating(
        to_record,
        lambda part: _record_in_savepoint(connection, part, window_seconds, meters),
    )
    report.skipped += [_skipped_event(event, reason) for event, reason in recorded.refused]
    counted = _without(counted, {event.key for event, _ in recorded.refused})
    report.events_counted += len(counted)
    before = repository.window_totals(
        connection,
        start=start,
        end=end,
        window_seconds=window_seconds,
        organization_id=request.organization_id,
        metric=request.metric,
    )
    after = sum_windows(counted)
    report.changes = _merged(report.changes, metric_changes(before, after))
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    # Written in a dry run too: its savepoint's rollback undoes them with the rest.
    meter_windows, meter_values = _rebuild_meters(
        connection, counted, request, start, end, window_seconds, meters
    )
    report.meter_windows_changed += meter_windows
    report.meter_values_changed += meter_values
    if not request.dry_run:
        report.events_recorded += sum(recorded.written)
        _set_windows(connection, before, after, changed, window_seconds)
        _rebuild_cuts(connection, counted, request, start, end, window_seconds, meters)


def _merged(changes: list[MetricChange], more: list[MetricChange]) -> list[MetricChange]:
    """Two slices' changes per metric as one (slices hold disjoint windows, so they add)."""
    by_metric = {c.metric: c for c in changes}
    for change in more:
        known = by_metric.get(change.metric)
        if known is None:
            by_metric[change.metric] = change
            continue
        known.quantity_before = SUM_CONTEXT.add(known.quantity_before, change.quantity_before)
        known.quantity_after = SUM_CONTEXT.add(known.quantity_after, change.quantity_after)
        known.events_before += change.events_before
        known.events_after += change.events_after
        known.windows_changed += change.windows_changed
    return sorted(by_metric.values(), key=lambda c: c.metric)


def _record_in_savepoint(
    connection: Connection,
    events: Sequence[CountableEvent],
    window_seconds: int,
    meters: Mapping[str, MeterDefinition],
) -> int:
    with connection.begin_nested():
        return repository.record_events(
            connection, events, window_seconds, batch_meter_facts(events, meters)
        )


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
