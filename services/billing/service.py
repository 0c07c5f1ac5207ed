"""A billing run: for every subscription, price its periods, write its invoices and meter report
intents in one unit of work, then report to Stripe and reconcile. Idempotent by construction: a
rerun with no new usage finds every invoice and every reported total already as it should be.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from services.billing import repository
from services.billing.gateway import BillingGateway
from services.billing.invoices import (
    Subject,
    changed_invoices,
    invoice_document,
    invoices_of_run,
    period_pricing,
    plan_invoices,
)
from services.billing.periods import Period, ToBill, billing_periods
from services.billing.pricing import PlanPrice
from services.billing.reporting import (
    UsageToReport,
    ledger_rows,
    plan_report,
    record_intents,
    report_document,
    send_unsent,
)
from services.billing.schemas import plan_price, pricing_snapshot
from shared.logs import log_event
from shared.subscriptions import BILLED_STATUSES, RENEWING_STATUSES

logger = logging.getLogger("meterline.billing")


@dataclass
class RunResult:
    """`invoices` are the ones this run wrote (new or changed); `billed` every invoice of the
    run's periods, changed or not, which is what `billing run --json` lists."""

    run_id: uuid.UUID | None
    as_of: datetime
    invoices: list[dict[str, Any]] = field(default_factory=list)
    billed: list[dict[str, Any]] = field(default_factory=list)
    reported: list[dict[str, Any]] = field(default_factory=list)
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    subscriptions: int = 0

    def document(self) -> dict[str, Any]:
        """`billing run --json`, the shape of DESIGN.md section 5."""
        return {
            "as_of": self.as_of.isoformat(),
            "invoices": [invoice_document(invoice) for invoice in self.billed],
            "reported": [report_document(row) for row in self.reported],
            "mismatches": self.mismatches,
        }


@dataclass
class _Work:
    """One subscription's share of a run, prepared before its unit of work."""

    row: Any
    subject: Subject
    periods: list[Period]
    existing: list[dict[str, Any]]
    meters: dict[str, str]
    canceled_at: datetime | None = None


Progress = Callable[[int, int], None]
# Subscriptions written per transaction: large enough that a 10,000-subscription run is a few
# dozen round trips, small enough that a retry of one chunk, one by one, stays quick.
CHUNK = 500


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
) -> RunResult:
    result = RunResult(run_id=None, as_of=as_of)
    with engine.begin() as connection:
        work = _prepare(connection, as_of, lateness_horizon, organization_id)
        totals = repository.period_totals(connection, _queries(work))
    result.subscriptions = len(work)
    if not dry_run:
        result.run_id = _start_run(engine, as_of)
    try:
        for done in range(0, len(work), CHUNK):
            chunk = work[done : done + CHUNK]
            if gateway is not None and not dry_run:
                for item in chunk:
                    if (
                        item.row.stripe_customer_id is None
                        or item.row.stripe_subscription_id is None
                    ):
                        _link_stripe(engine, gateway, item)
            planned = []
            for item in chunk:
                desired = plan_invoices(
                    item.subject,
                    item.periods,
                    item.existing,
                    totals.get(item.subject.subscription_id, {}),
                    as_of,
                )
                changed = changed_invoices(desired, item.existing)
                planned.append((item, changed))
                result.invoices.extend(changed)
                result.billed.extend(invoices_of_run(desired, item.existing))
            if not dry_run:
                _write_chunk(engine, planned, totals, now, gateway is not None)
            if progress is not None:
                progress(done + len(chunk), len(work))
        if gateway is not None and not dry_run:
            ids = [item.subject.subscription_id for item in work]
            result.reported = send_unsent(engine, gateway, now, ids)
            if reconcile:
                from services.billing.reconcile import reconcile_run

                result.mismatches = reconcile_run(
                    engine,
                    gateway,
                    work_ids=ids,
                    run_id=result.run_id,
                    as_of=as_of,
                    now=now,
                    settle=settle,
                )
                # Fixes (missing deltas) are intents too: send them in the same run.
                result.reported += send_unsent(engine, gateway, now, ids)
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
        invoices_changed=len(result.invoices),
        reported=len(result.reported),
        mismatches=len(result.mismatches),
        dry_run=dry_run,
    )
    return result


def _prepare(
    connection: Connection,
    as_of: datetime,
    horizon: timedelta,
    organization_id: uuid.UUID | None,
) -> list[_Work]:
    rows = [
        row
        for row in repository.subscriptions_to_bill(connection, organization_id=organization_id)
        if str(row.status) in BILLED_STATUSES
    ]
    since = as_of - horizon
    existing = repository.invoices_of(connection, [row.id for row in rows], since=since)
    prices: dict[tuple[uuid.UUID, str], Any] = {}
    to_bill: dict[uuid.UUID, ToBill] = {}
    work = []
    for row in rows:
        interval = str(row.billing_interval)
        flat = row.price_yearly if interval == "year" else row.price_monthly
        key = (row.plan_id, interval)
        if key not in prices:
            prices[key] = plan_price(row.features or {}, flat)
        to_bill[row.id] = billing_periods(
            Period(row.current_period_start, row.current_period_end),
            interval,
            as_of,
            renews=str(row.status) in RENEWING_STATUSES,
            anchor=row.billing_cycle_anchor,
            cancel_at_period_end=row.cancel_at_period_end,
        )
    # A period that ended before the horizon and whose invoice is final is settled: invoices_of
    # no longer returns its invoice (no late usage can reach it), so it must not be planned again
    # as if it had none (a canceled subscription keeps its last period as its current one).
    settled = repository.final_periods(
        connection,
        [(id_, p.start) for id_, bill in to_bill.items() for p in bill.periods if p.end <= since],
    )
    for row in rows:
        periods = [p for p in to_bill[row.id].periods if (row.id, p.start) not in settled]
        plan = prices[(row.plan_id, str(row.billing_interval))]
        work.append(
            _Work(
                row=row,
                subject=Subject(
                    row.id,
                    row.organization_id,
                    row.currency,
                    plan,
                    pricing_snapshot(row.plan_id, plan.flat_amount, row.features or {}),
                    row.trial_end,
                ),
                periods=periods,
                existing=existing.get(row.id, []),
                meters={m: p.stripe_meter for m, p in plan.metered.items() if p.stripe_meter},
                canceled_at=to_bill[row.id].canceled_at,
            )
        )
    return work


def _queries(work: list[_Work]) -> list[repository.PeriodQuery]:
    """The usage to total: each period to bill with the current plan's metrics, and each stored
    final invoice's period with the metrics of the pricing it was billed with (late usage)."""
    queries = []
    for item in work:
        current = item.subject.plan
        pricing: dict[datetime, tuple[datetime, PlanPrice]] = {
            p.start: (p.end, current) for p in item.periods
        }
        for invoice in item.existing:
            if invoice["period_start"] in pricing:
                continue
            # A draft not among the periods is finalised with the current plan; a final one
            # only takes adjustments, priced with its own snapshot.
            final = invoice["status"] == "final"
            price = period_pricing(invoice, current) if final else current
            pricing[invoice["period_start"]] = (invoice["period_end"], price)
        for start, (end, price) in pricing.items():
            metrics = tuple(sorted(price.metered))
            if not metrics:
                continue
            queries.append(
                repository.PeriodQuery(
                    item.subject.subscription_id,
                    item.subject.organization_id,
                    start,
                    end,
                    metrics,
                    tuple(m for m in metrics if price.metered[m].aggregation == "max"),
                )
            )
    return queries


def _write_chunk(
    engine: Engine,
    planned: list[tuple[_Work, list[dict[str, Any]]]],
    totals: dict[uuid.UUID, dict[tuple[datetime, str], Any]],
    now: datetime,
    report: bool,
) -> None:
    """Write a chunk of subscriptions in one transaction: each subscription's invoices, period
    and report intents land together or not at all (a chunk only ever holds whole subscriptions).
    If the chunk fails, each subscription is retried in a transaction of its own, so one bad
    subscription neither holds back nor hides behind the others."""
    try:
        with engine.begin() as connection:
            _write(connection, planned, totals, now, report)
    except sa_exc.DBAPIError:
        if len(planned) == 1:
            raise
        for one in planned:
            with engine.begin() as connection:
                _write(connection, [one], totals, now, report)


def _write(
    connection: Connection,
    planned: list[tuple[_Work, list[dict[str, Any]]]],
    totals: dict[uuid.UUID, dict[tuple[datetime, str], Any]],
    now: datetime,
    report: bool,
) -> None:
    repository.save_invoices(connection, [inv for _, invoices in planned for inv in invoices])
    repository.advance_periods(
        connection,
        [
            (item.subject.subscription_id, item.periods[-1].start, item.periods[-1].end)
            for item, _ in planned
            if item.periods and item.periods[-1].start != item.row.current_period_start
        ],
    )
    repository.cancel_subscriptions(
        connection,
        [
            (item.subject.subscription_id, item.canceled_at)
            for item, _ in planned
            if item.canceled_at is not None
        ],
    )
    if not report:
        return
    reporting = [item for item, _ in planned if item.meters]
    customers = repository.customers_of(
        connection, [item.subject.organization_id for item in reporting]
    )
    ledger = ledger_rows(connection, [item.subject.subscription_id for item in reporting])
    intents = []
    for item in reporting:
        customer_id = customers.get(item.subject.organization_id)
        if customer_id:
            own = totals.get(item.subject.subscription_id, {})
            intents += _intents(ledger, item, own, customer_id, now)
    record_intents(connection, intents)


def _intents(
    ledger: dict[Any, list[dict[str, Any]]],
    item: _Work,
    totals: dict[tuple[datetime, str], Any],
    customer_id: str,
    now: datetime,
) -> list[dict[str, Any]]:
    ends = {p.start: p.end for p in item.periods}
    for invoice in item.existing:
        ends.setdefault(invoice["period_start"], invoice["period_end"])
    # A period that Stripe was told about but that now has no usage (a replay corrected it)
    # totals 0, so the compensating delta is still sent.
    keys = set(totals) | {
        (start, metric) for (_, metric, start) in ledger if start in ends and metric in item.meters
    }
    intents = []
    for start, metric in sorted(keys):
        if metric not in item.meters:
            continue
        total = totals.get((start, metric), Decimal(0))
        usage = UsageToReport(
            item.subject.subscription_id,
            customer_id,
            metric,
            item.meters[metric],
            start,
            ends[start],
            total,
        )
        intent = plan_report(usage, ledger.get((usage.subscription_id, metric, start), []), now)
        if intent is not None:
            intents.append(intent)
    return intents


def _link_stripe(engine: Engine, gateway: BillingGateway, item: _Work) -> None:
    """Create the organization's Stripe customer and the subscription's Stripe subscription where
    they have none. The calls carry idempotency keys on our ids, so a crash between the call and
    the write below links the same Stripe objects on the next run."""
    row = item.row
    if str(row.status) not in RENEWING_STATUSES:
        return
    with engine.connect() as connection:
        org = repository.organization_of(connection, row.organization_id)
        plan = repository.plan_prices_of(connection, row.plan_id)
        linked = repository.stripe_subscription_of(connection, row.id)
    customer_id = org.stripe_customer_id or gateway.create_customer(
        str(row.organization_id), org.name
    )
    if org.stripe_customer_id is None:
        with engine.begin() as connection:
            repository.set_stripe_customer(connection, row.organization_id, customer_id)
    if linked is not None:
        return
    interval = str(row.billing_interval)
    price_column = "stripe_price_id_yearly" if interval == "year" else "stripe_price_id_monthly"
    price_id = getattr(plan, price_column)
    if price_id is None:
        amount = row.price_yearly if interval == "year" else row.price_monthly
        price_id = gateway.ensure_price(str(row.plan_id), plan.name, interval, amount, row.currency)
        with engine.begin() as connection:
            repository.set_stripe_price(connection, row.plan_id, price_column, price_id)
    stripe_subscription_id = gateway.create_subscription(
        str(row.id), customer_id, price_id, row.current_period_start, row.current_period_end
    )
    with engine.begin() as connection:
        repository.link_subscription(connection, row.id, stripe_subscription_id, customer_id)


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
