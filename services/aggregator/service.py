"""Applying one batch to PostgreSQL: the ledger decides what is new, the windows get exactly that.

The order of a batch (the guarantee rests on it; services/aggregator/app.py runs the steps):
  (1) decode + validate every record; the unreadable become dead letters, nothing is sent yet.
  (2) one PostgreSQL transaction: the replay lock shared and the organizations' locks in sorted
      order, the ledger lookup, the insert of new ledger rows, the window upserts, the meter
      windows and distinct values of metered metrics (shared.meter_usage, with the meters read
      at most key_cache_ttl_seconds before: metercache.py) and the parts of the registered usage
      cuts inside those windows (shared.usage_cuts) with their meter pieces
      (shared.meter_pieces); commit.
  (3) send the dead letters (unreadable, unknown references, conflicting duplicates) and wait for
      the broker's ack.
  (4) only then return, so that Faust acks the messages and may commit their offsets.
A crash anywhere before (4) redelivers the batch; the ledger rows committed in (2) make the
redelivery count nothing twice, and dead letters may be sent twice (at least once, by design).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.engine import Connection, Engine

from services.aggregator import repository
from services.aggregator.batch import (
    CountableEvent,
    DeadLetter,
    ReadRules,
    SourceRecord,
    WindowKey,
    WindowTotal,
    conflict_letter,
    cut_events,
    event_letter,
    read_records,
    select_new_events,
    split_at_ledger_floor,
    sum_windows,
    usage_deltas,
)
from services.aggregator.ledger_partitions import PartitionKeeper, ledger_floor, months_for
from services.aggregator.meter_windows import batch_meter_facts, meter_usage, piece_events
from services.aggregator.metercache import MeterCache
from services.aggregator.refusals import LedgerChangedUnderBatch, write_isolating
from shared.db import pipelined, rows_affected
from shared.logs import log_event
from shared.meter_pieces import add_meter_pieces, pieces_of
from shared.meter_usage import record_meter_usage
from shared.meters import MeterDefinition
from shared.settings import Settings
from shared.usage import record_usage
from shared.usage_cuts import add_cut_totals, cut_deltas, cuts_within_windows

logger = logging.getLogger("meterline.aggregator")


@dataclass(slots=True)
class BatchResult:
    counted: int = 0
    duplicates: int = 0
    conflicts: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)


def add_to_cuts(
    connection: Connection,
    events: Sequence[CountableEvent],
    windows: Mapping[WindowKey, WindowTotal],
    window_seconds: int,
    meters: Mapping[str, MeterDefinition],
) -> None:
    """Add the events at or after a registered usage cut to that cut's totals, and each event of
    a metered metric in a window with cuts to the meter piece holding its timestamp."""
    cuts = cuts_within_windows(connection, ((k[0], k[4]) for k in windows), window_seconds)
    if cuts:
        add_cut_totals(connection, cut_deltas(cut_events(events), cuts, window_seconds))
        add_meter_pieces(connection, pieces_of(piece_events(events, meters), cuts, window_seconds))


class BatchApplier:
    """Steps (1) and (2) of a batch, synchronous (the Faust agent runs it in a worker thread)."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self._settings = settings
        self._partitions = PartitionKeeper(engine)
        self._meters = MeterCache(ttl=settings.key_cache_ttl_seconds)
        self.rules = ReadRules(
            lateness_horizon=settings.lateness_horizon,
            max_future=timedelta(seconds=settings.max_future_seconds),
            window_seconds=settings.window_seconds,
        )

    def apply(self, records: Sequence[SourceRecord]) -> BatchResult:
        """Count a batch once. Transient database errors propagate (the caller retries all of
        it); an event the database refuses on its own is isolated and dead-lettered alone."""
        # (1) decode + validate.
        events, dead = read_records(records, self.rules)
        total = BatchResult(dead_letters=dead)
        # (2) in one transaction, or, if the database refuses some event, in halves down to
        # that event alone (refusals.py): what a refused attempt wrote was rolled back with it.
        isolated = write_isolating(events, self._count, on_first_refusal=self._isolating)
        for result in isolated.written:
            total.counted += result.counted
            total.duplicates += result.duplicates
            total.conflicts += result.conflicts
            total.dead_letters += result.dead_letters
        for event, reason in isolated.refused:
            total.dead_letters.append(
                event_letter(event, "database_rejected", f"event {event.event.id!r}: {reason}")
            )
        return total

    def _isolating(self, exc: BaseException) -> None:
        # Perhaps a ledger partition dropped under our cache: the halves create it again.
        self._partitions.forget()
        log_event(
            logger,
            "batch_isolating_events",
            logging.WARNING,
            error=type(getattr(exc, "orig", None) or exc).__name__,
        )

    def _count(self, events: Sequence[CountableEvent]) -> BatchResult:
        result = BatchResult()
        self._partitions.ensure(months_for(e.event.timestamp for e in events))
        # (2) one transaction: locks, ledger lookup, new ledger rows, window upserts; commit.
        with self.engine.begin() as connection:
            repository.lock_shared_for_batch(connection, (e.organization_id for e in events))
            # The floor is read under the lock: maintenance (which holds it exclusively) cannot
            # drop a partition between this check and this transaction's writes.
            above, missing = split_at_ledger_floor(events, ledger_floor(connection))
            result.dead_letters += missing
            references = repository.existing_references(connection, above)
            countable: list[CountableEvent] = []
            for event in above:
                problem = references.problem(event)
                if problem:
                    result.dead_letters.append(event_letter(event, "unknown_reference", problem))
                else:
                    countable.append(event)
            recorded = repository.counted_versions(connection, (e.key for e in countable))
            selection = select_new_events(countable, recorded)
            # One reading of the meters for the whole batch (re-read in this transaction when
            # older than the key-cache TTL): the ledger rows keep what meter pieces need of each
            # metered event, by the same meters the meter windows use below.
            meters = self._meters.get(connection) if selection.new else {}
            facts = batch_meter_facts(selection.new, meters)
            # Pipelined: the ledger's insert runs in PostgreSQL while the windows are summed
            # here, and the window upserts while the meter windows are; the block's end waits
            # for all three, and only then is the ledger's row count known.
            with pipelined(connection):
                ledger = repository.send_events(
                    connection, selection.new, self._settings.window_seconds, facts
                )
                windows = sum_windows(selection.new)
                record_usage(connection, usage_deltas(windows, self._settings.window_seconds))
                # Metered metrics also keep their windows per dimension values: same events,
                # same transaction, so the ledger that counts an event once counts it once here.
                record_meter_usage(
                    connection,
                    meter_usage(selection.new, meters, facts),
                    self._settings.window_seconds,
                )
            result.counted = rows_affected(ledger)
            if result.counted != len(selection.new):
                # Only a writer that skipped the organization lock could get here: roll back
                # (the windows too) and let the retry's lookup see what it wrote.
                raise LedgerChangedUnderBatch(
                    f"{len(selection.new) - result.counted} ledger rows appeared during the batch"
                )
            # The cuts inside this batch's windows (usually none) get the events at or after
            # them, and their meter pieces the metered events, in the same transaction as the
            # windows, so a cut's part or piece never lags its window.
            add_to_cuts(connection, selection.new, windows, self._settings.window_seconds, meters)
        result.duplicates = selection.duplicates
        result.conflicts = len(selection.conflicts)
        result.dead_letters += [conflict_letter(e) for e in selection.conflicts]
        return result
