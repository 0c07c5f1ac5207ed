"""A billing run: every subscription's periods priced, invoiced, reported and collected.

The steps of a run, in this order (each opens its own transactions; nothing below them does):
  (0) refuse an `as_of` later than now (plus a small clock tolerance) unless it is a dry run:
      final invoices never change, so a period must not be finalized before it ended;
  (1) read every subscription to bill with its plans over time and its organization's usage
      version; link a Stripe customer to organizations without one (steps 2 of stripe_steps);
      skip every subscription whose inputs are those it was last billed from and whose open
      period has not ended since (its billing state): a rerun with nothing new reads no usage;
  (2) register the usage cuts the segments' boundaries need (shared.usage_cuts) before any
      total is read across them: from then on batches keep their parts;
  (3) total every segment's usage in one REPEATABLE READ transaction, so the windows and the
      parts of the cuts come from one snapshot;
  (4) price (pure: services.billing.invoices);
  (5) write chunk by chunk (two writer threads, while the next chunk is priced):
      invoices, periods, cancellations, meter report intents and billing states of whole
      subscriptions land together or not at all;
  (6) Stripe (stripe_steps): send the meter reports, collect the final invoices, reconcile.
A dry run does (1), (3) and (4), reading the parts of unregistered cuts from the ledger, and
writes nothing. Idempotent: a rerun with no new usage finds everything as it should be.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import NamedTuple

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from services.billing import invoice_repository, repository, stripe_steps
from services.billing.filter_totals import KnownPieces, filtered_totals, metered_totals
from services.billing.gateway import BillingGateway
from services.billing.invoices import (
    Invoice,
    Subject,
    Totals,
    changed_invoices,
    invoice_document,
    invoices_of_run,
    plan_invoices,
)
from services.billing.periods import Period, Phase, ToBill, billing_periods
from services.billing.pricing import PricedFilter, filter_label
from services.billing.reconcile import mismatch_document
from services.billing.report_repository import Mismatch
from services.billing.reporting import MeterReport
from services.billing.repository import SubscriptionToBill
from services.billing.terms import (
    InvoicePricing,
    PlanHistory,
    query_names,
)
from services.billing.usage_totals import SegmentQuery, segment_totals
from shared.errors import InvalidInput
from shared.logs import log_event
from shared.meter_pieces import ledger_pieces
from shared.meters import meters_by_metric
from shared.subscriptions import BILLED_STATUSES, RENEWING_STATUSES
from shared.usage_cuts import (
    Cut,
    CutPart,
    ledger_cut_parts,
    register_cuts,
    registered_cut_parts,
    splits_windows,
)
from shared.usage_locks import no_rebuild_running

logger = logging.getLogger("meterline.billing")

#: How far past now a run's `as_of` may be: clocks of two hosts differ by that much at most.
AS_OF_TOLERANCE = timedelta(seconds=60)
#: Part of every billing state's fingerprint: a release that changes how invoices are computed
#: bumps it, so no subscription is skipped on the strength of the old rules.
RULES_VERSION = "2"
Progress = Callable[[int, int], None]
# Subscriptions written per transaction: large enough that a 10,000-subscription run is a few
# dozen round trips, small enough that a retry of one chunk, one by one, stays quick.
CHUNK = 500
#: Chunks written at once, each on a connection of its own.
WRITERS = 2


@dataclass
class RunResult:
    """`invoices` are the ones this run wrote (new or changed); `billed` every invoice of the
    run's subscriptions, changed or not (what `billing run --json` lists), when asked for."""

    run_id: uuid.UUID | None
    as_of: datetime
    invoices: list[Invoice] = field(default_factory=list)
    billed: list[Invoice] = field(default_factory=list)
    reported: list[MeterReport] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    collected: list[Invoice] = field(default_factory=list)
    subscriptions: int = 0
    skipped: int = 0
    #: Seconds spent in each step of the run (read, segments, cuts, totals, price_and_write).
    step_seconds: dict[str, float] = field(default_factory=dict)

    def document(self) -> dict[str, object]:
        """`billing run --json`, the shape of DESIGN.md section 5."""
        return {
            "as_of": self.as_of.isoformat(),
            "invoices": [invoice_document(invoice) for invoice in self.billed],
            "reported": [stripe_steps.report_document(report) for report in self.reported],
            "mismatches": [mismatch_document(m) for m in self.mismatches],
        }


@dataclass
class _Work:
    """One subscription's share of a run, prepared before its unit of work."""

    row: SubscriptionToBill
    subject: Subject
    to_bill: ToBill
    existing: list[Invoice] = field(default_factory=list)
    pricings: dict[Period, InvoicePricing] = field(default_factory=dict)
    desired: list[Invoice] = field(default_factory=list)
    changed: list[Invoice] = field(default_factory=list)


def run_billing(
    engine: Engine,
    *,
    as_of: datetime,
    now: datetime,
    lateness_horizon: timedelta,
    organization_id: uuid.UUID | None = None,
    dry_run: bool = False,
    gateway: BillingGateway | None = None,
    reconcile: bool = True,
    settle: timedelta = timedelta(0),
    progress: Progress | None = None,
    list_invoices: bool = True,
) -> RunResult:
    # (0) No final invoice for a period that has not ended.
    if as_of > now + AS_OF_TOLERANCE and not dry_run:
        raise InvalidInput(
            f"--as-of {as_of.isoformat()} is later than now ({now.isoformat()}): a run would "
            "finalize periods that have not ended; preview it with --dry-run"
        )
    run = _Run(
        engine,
        RunResult(run_id=None, as_of=as_of),
        as_of=as_of,
        now=now,
        since=as_of - lateness_horizon,
        dry_run=dry_run,
        report=gateway is not None and not dry_run,
        horizon=lateness_horizon,
    )
    result = run.result
    clock = _StepClock(result.step_seconds)
    rows, work, skipped = run.read(organization_id, gateway)
    clock.done("read")
    try:
        queries = _queries(work, as_of)
        clock.done("segments")
        missing = run.register_cuts(queries)
        clock.done("cuts")
        totals = run.totals(queries, missing)
        clock.done("totals")
        run.price_and_write(work, totals, progress=progress, list_invoices=list_invoices)
        clock.done("price_and_write")
        if list_invoices:
            run.list_skipped(skipped)
        # (6) Stripe.
        if run.report:
            assert gateway is not None
            stripe_steps.run_stripe_steps(
                engine,
                gateway,
                result,
                [row.id for row in rows] if organization_id else None,
                [row.id for row in rows],
                now=now,
                since=run.since,
                reconcile_run=reconcile,
                settle=settle,
            )
    except Exception as exc:
        if result.run_id is not None:
            _finish_run(engine, result, status="failed", error=str(exc)[:1000])
        raise
    if result.run_id is not None:
        _finish_run(engine, result, status="finished")
    log_event(
        logger,
        "billing_run_finished",
        subscriptions=result.subscriptions,
        skipped=result.skipped,
        invoices_changed=len(result.invoices),
        reported=len(result.reported),
        collected=len(result.collected),
        mismatches=len(result.mismatches),
        dry_run=dry_run,
        step_seconds={step: round(seconds, 3) for step, seconds in result.step_seconds.items()},
    )
    return result


class _StepClock:
    """Wall time of each step, for the run's log line and the benchmark."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self._seconds = seconds
        self._last = time.perf_counter()

    def done(self, step: str) -> None:
        now = time.perf_counter()
        self._seconds[step] = now - self._last
        self._last = now


@dataclass
class _Run:
    """The steps (1) to (5) of one run, with what they share."""

    engine: Engine
    result: RunResult
    as_of: datetime
    now: datetime
    since: datetime
    dry_run: bool
    report: bool
    horizon: timedelta
    salt: str = ""

    def read(
        self,
        organization_id: uuid.UUID | None,
        gateway: BillingGateway | None,
        *,
        ignore_states: bool = False,
    ) -> tuple[list[SubscriptionToBill], list[_Work], list[uuid.UUID]]:
        """(1) The subscriptions to bill, the work to do, and the ids of those to skip
        (`ignore_states`: none, as for a benchmark of the full work)."""
        with self.engine.begin() as connection:
            rows = repository.subscriptions_to_bill(
                connection, statuses=BILLED_STATUSES, organization_id=organization_id
            )
            catalog = repository.plan_catalog_version(connection)
            phases = repository.phases_of(connection, [row.id for row in rows])
            plan_ids = {row.plan_id for row in rows} | {
                phase.plan_id for found in phases.values() for phase in found
            }
            histories = repository.plan_histories(connection, plan_ids)
        if self.report:
            assert gateway is not None
            # Only organizations with something left to bill get a Stripe customer: not those
            # whose subscriptions ended before the horizon.
            rows = stripe_steps.link_customers(
                self.engine,
                gateway,
                rows,
                needed={row.organization_id for row in rows if _still_billed(row, self.since)},
            )
        self.result.subscriptions = len(rows)
        if not self.dry_run:
            self.result.run_id = _start_run(self.engine, self.as_of)
        self.salt = f"{RULES_VERSION}|{catalog}|{int(self.horizon.total_seconds())}|{self.report}"
        work: list[_Work] = []
        skipped: list[uuid.UUID] = []
        for row in rows:
            subject = _subject(row, phases.get(row.id, ()), histories)
            state = row.state
            if (
                not ignore_states
                and state is not None
                and state.fingerprint == _fingerprint(row, subject, self.salt)
                and state.valid_from <= self.as_of
                and (state.valid_until is None or self.as_of < state.valid_until)
            ):
                skipped.append(row.id)
                continue
            work.append(_Work(row, subject, _to_bill(row, self.as_of)))
        self.result.skipped = len(skipped)
        with self.engine.begin() as connection:
            _load_invoices(connection, work, self.since)
        return rows, work, skipped

    def register_cuts(self, queries: Sequence[tuple[_QueryKey, SegmentQuery]]) -> list[Cut]:
        """(2) Register the cuts of the segments' boundaries; returns those that were not (a dry
        run registers nothing: step 3 reads their parts from the ledger)."""
        cuts = sorted({cut for _, q in queries for cut in q.cuts if splits_windows(cut.at)})
        with self.engine.begin() as connection:
            registered, _ = registered_cut_parts(connection, cuts)
        missing = [cut for cut in cuts if cut not in registered]
        if missing and not self.dry_run:
            with self.engine.begin() as connection:
                register_cuts(connection, missing)
        return missing

    def totals(
        self, queries: Sequence[tuple[_QueryKey, SegmentQuery]], missing: Sequence[Cut]
    ) -> dict[uuid.UUID, Totals]:
        """(3) Every segment's usage, the windows and the cuts' parts from one snapshot, taken
        while no replay is rebuilding (Conflict if one is)."""
        cuts = sorted({cut for _, q in queries for cut in q.cuts if splits_windows(cut.at)})
        with (
            no_rebuild_running(self.engine),
            self.engine.connect().execution_options(
                isolation_level="REPEATABLE READ"
            ) as connection,
            connection.begin(),
        ):
            registered, parts = registered_cut_parts(connection, cuts)
            known = KnownPieces(registered=frozenset(registered))
            if self.dry_run and missing:
                parts = {**ledger_cut_parts(connection, missing), **parts}
                known = KnownPieces(
                    registered=frozenset(registered),
                    unregistered=frozenset(missing),
                    from_ledger=ledger_pieces(connection, missing),
                )
            return _totals(connection, queries, parts, known)

    def price_and_write(
        self,
        work: list[_Work],
        totals: dict[uuid.UUID, Totals],
        *,
        progress: Progress | None,
        list_invoices: bool,
    ) -> None:
        """(4) Price each chunk of subscriptions and prepare its rows, then (5) write it. Two
        writer threads write chunks, each in a transaction of its own, while this one prices
        the next: a writer only waits on PostgreSQL, whose per-row work (the invoices' keys,
        indexes and JSON) takes longer than the pricing, so two backends write side by side.
        Chunks hold disjoint subscriptions; at most WRITERS + 1 are in flight, and the first
        failure (in chunk order) stops the run before it is reported."""
        with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="billing-writer") as writer:
            in_flight: list[Future[None]] = []
            for done in range(0, len(work), CHUNK):
                chunk = work[done : done + CHUNK]
                for item in chunk:
                    item.desired = plan_invoices(
                        item.subject,
                        item.to_bill.periods,
                        item.existing,
                        totals.get(item.row.id, {}),
                        self.as_of,
                        item.pricings,
                    )
                    item.changed = changed_invoices(item.desired, item.existing)
                    self.result.invoices.extend(item.changed)
                    if list_invoices:
                        self.result.billed.extend(invoices_of_run(item.desired, item.existing))
                if not self.dry_run:
                    prepared = _chunk_write(chunk, as_of=self.as_of, salt=self.salt)
                    while len(in_flight) > WRITERS:
                        in_flight.pop(0).result()
                    in_flight.append(writer.submit(self._write_chunk, prepared, totals))
                if progress is not None:
                    progress(done + len(chunk), len(work))
            for future in in_flight:
                future.result()

    def _write_chunk(self, prepared: _ChunkWrite, totals: dict[uuid.UUID, Totals]) -> None:
        _write_chunk(
            self.engine,
            prepared,
            totals,
            now=self.now,
            as_of=self.as_of,
            salt=self.salt,
            report=self.report,
        )

    def list_skipped(self, skipped: Sequence[uuid.UUID]) -> None:
        """The stored invoices of the subscriptions skipped, for the run's listing."""
        if skipped:
            with self.engine.begin() as connection:
                stored = invoice_repository.invoices_of(connection, skipped, since=self.since)
            self.result.billed.extend(invoice for found in stored.values() for invoice in found)
        self.result.billed.sort(key=lambda invoice: (invoice.subscription_id, invoice.period_start))


def _subject(
    row: SubscriptionToBill, phases: Sequence[Phase], plans: dict[uuid.UUID, PlanHistory]
) -> Subject:
    return Subject(
        subscription_id=row.id,
        organization_id=row.organization_id,
        currency=row.currency,
        interval=row.billing_interval,
        plan_id=row.plan_id,
        plans=plans,
        phases=tuple(phases),
        trial_end=row.trial_end,
    )


def _still_billed(row: SubscriptionToBill, since: datetime) -> bool:
    ends = _ends_at(row)
    return ends is None or ends > since


def _ends_at(row: SubscriptionToBill) -> datetime | None:
    if row.status == "canceled":
        return row.canceled_at or row.current_period_end
    return None


def _to_bill(row: SubscriptionToBill, as_of: datetime) -> ToBill:
    return billing_periods(
        Period(row.current_period_start, row.current_period_end),
        row.billing_interval,
        as_of,
        renews=row.status in RENEWING_STATUSES,
        anchor=row.billing_cycle_anchor,
        cancel_at_period_end=row.cancel_at_period_end,
        ends_at=_ends_at(row),
    )


def _fingerprint(row: SubscriptionToBill, subject: Subject, salt: str) -> str:
    """What a subscription's invoices are computed from, hashed: its terms, its plan phases, its
    organization's usage version and Stripe customer, and the run's rules (`salt`)."""
    basis = "|".join(
        str(value)
        for value in (
            salt,
            row.status,
            row.plan_id,
            row.billing_interval,
            row.current_period_start.isoformat(),
            row.current_period_end.isoformat(),
            row.billing_cycle_anchor.isoformat() if row.billing_cycle_anchor else "",
            row.cancel_at_period_end,
            row.canceled_at.isoformat() if row.canceled_at else "",
            row.trial_end.isoformat() if row.trial_end else "",
            row.currency,
            row.stripe_customer_id or "",
            row.usage_version,
            ";".join(f"{p.starts_at.isoformat()}={p.plan_id}" for p in subject.phases),
        )
    )
    return hashlib.sha256(basis.encode()).hexdigest()


def _after_run(row: SubscriptionToBill, to_bill: ToBill) -> SubscriptionToBill:
    """The subscription as the run leaves it (its current period moved on, canceled at its end):
    its billing state is fingerprinted from this, so the next run recognises it."""
    if to_bill.periods:
        last = to_bill.periods[-1]
        row = replace(row, current_period_start=last.start, current_period_end=last.anchored_end)
    if to_bill.canceled_at is not None:
        row = replace(
            row, status="canceled", canceled_at=to_bill.canceled_at, cancel_at_period_end=False
        )
    return row


def _load_invoices(connection: Connection, work: list[_Work], since: datetime) -> None:
    """Each subscription's stored invoices, and its periods without the settled ones: a period
    that ended before the horizon with a final invoice takes no more late usage (and invoices_of
    no longer returns it, so it must not be planned again as if it had none)."""
    existing = invoice_repository.invoices_of(
        connection, [item.row.id for item in work], since=since
    )
    settled = invoice_repository.final_periods(
        connection,
        [
            (item.row.id, period.start)
            for item in work
            for period in item.to_bill.periods
            if period.end <= since
        ],
    )
    for item in work:
        item.existing = existing.get(item.row.id, [])
        periods = [p for p in item.to_bill.periods if (item.row.id, p.start) not in settled]
        item.to_bill = ToBill(periods, item.to_bill.canceled_at)


def _pricings(item: _Work, as_of: datetime) -> list[InvoicePricing]:
    """Every pricing the subscription's invoices will read usage for: its periods' (a draft not
    among them as well; kept on the work item for step 4) and its stored final invoices' own."""
    starts = {period.start for period in item.to_bill.periods}
    periods = list(item.to_bill.periods) + [
        Period(invoice.period_start, invoice.period_end)
        for invoice in item.existing
        if invoice.status == "draft" and invoice.period_start not in starts
    ]
    finals = {i.period_start: i for i in item.existing if i.status == "final"}
    for period in periods:
        if period.start not in finals:
            item.pricings[period] = item.subject.pricing(period, as_of)
    return [
        *item.pricings.values(),
        *(i.pricing for i in finals.values() if i.pricing is not None),
    ]


class _QueryKey(NamedTuple):
    subscription_id: uuid.UUID
    start: datetime
    end: datetime


def _queries(work: list[_Work], as_of: datetime) -> list[tuple[_QueryKey, SegmentQuery]]:
    """One query per distinct segment of each subscription, with every metric a plan of that
    segment prices (a draft and a final invoice may share a segment)."""
    # Per segment the metered prices of each pricing that reads it: nearly always one, whose
    # names are sorted once per distinct price (query_names is cached).
    wanted: dict[_QueryKey, tuple[uuid.UUID, list[str]]] = {}
    for item in work:
        for pricing in _pricings(item, as_of):
            for segment in pricing.segments:
                key = _QueryKey(item.row.id, segment.start, segment.end)
                found = wanted.get(key)
                if found is None:
                    wanted[key] = (item.row.organization_id, [segment.metered_json])
                elif segment.metered_json not in found[1]:
                    found[1].append(segment.metered_json)
    queries = []
    for key, (organization_id, prices) in wanted.items():
        metrics, maxima, filters = (
            query_names(prices[0]) if len(prices) == 1 else _union_names(prices)
        )
        if metrics or filters:
            queries.append(
                (key, SegmentQuery(organization_id, key.start, key.end, metrics, maxima, filters))
            )
    return queries


def _union_names(
    prices: Sequence[str],
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[PricedFilter, ...]]:
    metrics: set[str] = set()
    maxima: set[str] = set()
    filters: set[PricedFilter] = set()
    for metered_json in prices:
        names, largest, priced = query_names(metered_json)
        metrics.update(names)
        maxima.update(largest)
        filters.update(priced)
    ordered = sorted(filters, key=lambda f: filter_label(f.metric, f.match))
    return tuple(sorted(metrics)), tuple(sorted(maxima)), tuple(ordered)


def _totals(
    connection: Connection,
    queries: Sequence[tuple[_QueryKey, SegmentQuery]],
    parts: dict[Cut, tuple[CutPart, ...]],
    known: KnownPieces,
) -> dict[uuid.UUID, Totals]:
    found = segment_totals(connection, [query for _, query in queries], parts)
    totals: dict[uuid.UUID, dict[tuple[datetime, datetime, str], Decimal]] = {}
    for (key, _), quantities in zip(queries, found, strict=True):
        own = totals.setdefault(key.subscription_id, {})
        for metric, quantity in quantities.items():
            own[(key.start, key.end, metric)] = quantity
    # Prices per dimension filter, and prices of metrics whose meter does not sum, read the
    # meters' windows (few plans have them).
    meters = meters_by_metric(connection)
    for key, query in queries:
        own = totals.setdefault(key.subscription_id, {})
        if query.filters:
            for label, quantity in filtered_totals(
                connection, query.organization_id, query.start, query.end, query.filters, known
            ).items():
                own[(key.start, key.end, label)] = quantity
        unsummed = [
            meters[m] for m in query.metrics if m in meters and meters[m].aggregation != "sum"
        ]
        if unsummed:
            for meter in unsummed:
                own.pop((key.start, key.end, meter.metric), None)
            for metric_name, quantity in metered_totals(
                connection, query.organization_id, query.start, query.end, unsummed, known
            ).items():
                own[(key.start, key.end, metric_name)] = quantity
    return dict(totals)


@dataclass(frozen=True)
class _ChunkWrite:
    """What step 5 writes for a chunk of subscriptions, prepared by the pricing thread."""

    items: list[_Work]
    invoices: invoice_repository.InvoiceRows
    canceled: list[tuple[uuid.UUID, datetime]]
    billed: list[tuple[uuid.UUID, datetime, datetime, str, datetime, datetime | None]]


def _chunk_write(
    chunk: list[_Work], *, as_of: datetime, salt: str, upsert_all: bool = False
) -> _ChunkWrite:
    """`upsert_all`: write every invoice through the conflict-safe upsert, none straight in (for
    the retry of a chunk that failed, in case a stored row the run did not load was the cause)."""
    return _ChunkWrite(
        items=chunk,
        invoices=invoice_repository.invoice_rows(
            [invoice for item in chunk for invoice in item.changed],
            new=frozenset()
            if upsert_all
            else frozenset(
                invoice.id
                for item in chunk
                for invoice in item.changed
                if invoice.period_start not in {stored.period_start for stored in item.existing}
            ),
        ),
        canceled=[
            (item.row.id, item.to_bill.canceled_at)
            for item in chunk
            if item.to_bill.canceled_at is not None
        ],
        billed=[_billed(item, as_of=as_of, salt=salt) for item in chunk],
    )


def _billed(
    item: _Work, *, as_of: datetime, salt: str
) -> tuple[uuid.UUID, datetime, datetime, str, datetime, datetime | None]:
    """The subscription's current period after the run, and its billing state: fingerprinted
    as the run leaves it, valid from `as_of` until its open period ends."""
    after = _after_run(item.row, item.to_bill)
    return (
        item.row.id,
        after.current_period_start,
        after.current_period_end,
        _fingerprint(after, item.subject, salt),
        as_of,
        min((p.end for p in item.to_bill.periods if p.end > as_of), default=None),
    )


def _write_chunk(
    engine: Engine,
    write: _ChunkWrite,
    totals: dict[uuid.UUID, Totals],
    *,
    now: datetime,
    as_of: datetime,
    salt: str,
    report: bool,
) -> None:
    """Write a chunk of subscriptions in one transaction: each subscription's invoices, period,
    report intents and billing state land together or not at all (a chunk only ever holds whole
    subscriptions). If the chunk fails, each subscription is retried in a transaction of its
    own, so one bad subscription neither holds back nor hides behind the others."""
    try:
        with engine.begin() as connection:
            _write(connection, write, totals, now=now, report=report)
    except sa_exc.DBAPIError:
        for one in write.items:
            alone = _chunk_write([one], as_of=as_of, salt=salt, upsert_all=True)
            with engine.begin() as connection:
                _write(connection, alone, totals, now=now, report=report)


def _write(
    connection: Connection,
    write: _ChunkWrite,
    totals: dict[uuid.UUID, Totals],
    *,
    now: datetime,
    report: bool,
) -> None:
    invoice_repository.save_invoices(connection, write.invoices)
    repository.cancel_subscriptions(connection, write.canceled)
    if report:
        stripe_steps.record_report_intents(
            connection,
            [(item.row, [*item.desired, *item.existing]) for item in write.items],
            totals,
            now,
        )
    repository.record_billing(connection, write.billed)


def _start_run(engine: Engine, as_of: datetime) -> uuid.UUID:
    with engine.begin() as connection:
        return repository.start_run(connection, as_of)


def _finish_run(
    engine: Engine, result: RunResult, *, status: str, error: str | None = None
) -> None:
    assert result.run_id is not None
    with engine.begin() as connection:
        repository.finish_run(
            connection,
            result.run_id,
            status=status,
            error=error,
            subscriptions=result.subscriptions,
            invoices_changed=len(result.invoices),
            reported=len(result.reported),
            mismatches=len(result.mismatches),
        )
