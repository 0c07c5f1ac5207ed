"""The Stripe steps of a billing run (services/billing/service.py calls them in this order); each
Stripe answer is stored in a transaction of its own, so a crash between calls loses nothing and
repeats nothing:
  (1b) link a Stripe customer to every organization billed without one;
  (5)  (inside the run's chunk transaction) record the meter report intents;
  (6a) send the meter reports (services/billing/reporting.py: a refusal parks one report, a
       report older than Stripe's identifier window is checked against Stripe's summary first);
  (6b) collect every final invoice: a Stripe invoice with our lines, finalized
       (services/billing/collection.py);
  (6c) reconcile: Stripe's invoice totals, meter summaries and (legacy) subscriptions against
       ours (services/billing/reconcile.py); the safe fixes are recorded and sent at once.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from services.billing import invoice_repository, repository
from services.billing import report_repository as reports
from services.billing.collection import invoice_description, invoice_items, missing_items
from services.billing.gateway import BillingGateway, MeterEvent, StripeRefused
from services.billing.invoices import Invoice, Totals
from services.billing.reconcile import (
    Finding,
    invoice_findings,
    subscription_findings,
    usage_finding,
    usage_ranges,
)
from services.billing.report_repository import Mismatch
from services.billing.reporting import (
    OLDEST_TIMESTAMP,
    MeterReport,
    UsageToReport,
    is_stale,
    minute_of,
    plan_report,
    plan_restore,
    stale_decision,
)
from services.billing.repository import SubscriptionToBill
from shared.logs import log_event

if TYPE_CHECKING:
    from services.billing.service import RunResult

logger = logging.getLogger("meterline.billing.stripe")


# (1b) ------------------------------------------------------------------------------------------


def link_customers(
    engine: Engine,
    gateway: BillingGateway,
    rows: list[SubscriptionToBill],
    *,
    needed: set[uuid.UUID],
) -> list[SubscriptionToBill]:
    """Create the Stripe customer of every `needed` organization billed without one. The call
    carries an idempotency key on the organization's id, so a crash between the call and the
    write below links the same customer on the next run."""
    linked: dict[uuid.UUID, str] = {}
    for row in rows:
        if (
            row.stripe_customer_id
            or row.organization_id in linked
            or row.organization_id not in needed
        ):
            continue
        customer_id = gateway.create_customer(str(row.organization_id), row.organization_name)
        with engine.begin() as connection:
            repository.set_stripe_customer(connection, row.organization_id, customer_id)
        linked[row.organization_id] = customer_id
    return [
        replace(row, stripe_customer_id=linked[row.organization_id])
        if row.organization_id in linked
        else row
        for row in rows
    ]


# (5) -------------------------------------------------------------------------------------------


def _reported_usage(
    row: SubscriptionToBill, invoices: Sequence[Invoice], totals: Totals
) -> list[UsageToReport]:
    """The cumulative of each metered metric of each period of the subscription."""
    assert row.stripe_customer_id is not None
    seen: set[datetime] = set()
    usage = []
    for invoice in invoices:
        if invoice.period_start in seen or invoice.pricing is None or invoice.is_adjustment_only:
            continue
        seen.add(invoice.period_start)
        meters: dict[str, str] = {}
        quantities: dict[str, Decimal] = defaultdict(Decimal)
        for segment in invoice.pricing.segments:
            for metric, price in segment.price.metered.items():
                if price.stripe_meter:
                    meters[metric] = price.stripe_meter
                    quantities[metric] += totals.get((segment.start, segment.end, metric), 0)
        for metric, event_name in sorted(meters.items()):
            usage.append(
                UsageToReport(
                    row.id,
                    row.stripe_customer_id,
                    metric,
                    event_name,
                    invoice.period_start,
                    invoice.period_end,
                    quantities[metric],
                )
            )
    return usage


def record_report_intents(
    connection: Connection,
    subscriptions: Sequence[tuple[SubscriptionToBill, Sequence[Invoice]]],
    totals: dict[uuid.UUID, Totals],
    now: datetime,
) -> None:
    """The next meter report of every (subscription, metric, period) whose whole units changed;
    written in the subscription's unit of work, sent after it commits."""
    reporting = [(row, invoices) for row, invoices in subscriptions if row.stripe_customer_id]
    ledger = reports.ledger_rows(connection, [row.id for row, _ in reporting])
    intents = []
    for row, invoices in reporting:
        for usage in _reported_usage(row, invoices, totals.get(row.id, {})):
            key = (row.id, usage.metric, usage.period_start)
            intent = plan_report(usage, ledger.get(key, []), now)
            if intent is not None:
                intents.append(intent)
    reports.record_intents(connection, intents)


# (6a) ------------------------------------------------------------------------------------------


def send_reports(
    engine: Engine,
    gateway: BillingGateway,
    result: RunResult,
    subscription_ids: Sequence[uuid.UUID] | None,
    now: datetime,
) -> None:
    """Send every unsent, unparked report (of these subscriptions). A report Stripe refuses for
    good is parked with a `report_refused` mismatch and the others go on; a failure of Stripe
    itself (StripeUnavailable) stops the step, leaving the rest for the next run."""
    with engine.connect() as connection:
        pending = reports.unsent_reports(connection, subscription_ids)
    stale: dict[tuple[str, str, datetime], list[MeterReport]] = defaultdict(list)
    fresh = []
    for report in pending:
        if is_stale(report, now):
            stale[
                (report.customer_id, report.event_name, minute_of(report.event_timestamp)[0])
            ].append(report)
        else:
            fresh.append(report)
    for (customer_id, event_name, minute), group in sorted(stale.items()):
        fresh += _settle_stale(engine, gateway, result, customer_id, event_name, minute, group, now)
    for report in fresh:
        _send(engine, gateway, result, report, now)


def _settle_stale(
    engine: Engine,
    gateway: BillingGateway,
    result: RunResult,
    customer_id: str,
    event_name: str,
    minute: datetime,
    group: list[MeterReport],
    now: datetime,
) -> list[MeterReport]:
    """Reports whose last attempt is older than Stripe's identifier window: Stripe's summary of
    their minute decides (reporting.stale_decision); returns the ones to resend."""
    end = minute + timedelta(minutes=1)
    theirs = gateway.meter_total(event_name, customer_id, minute, end)
    with engine.connect() as connection:
        known = reports.sent_total(connection, customer_id, event_name, minute, end)
    decision = stale_decision(theirs, known, group)
    log_event(
        logger,
        "meter_reports_stale",
        reports=len(group),
        decision=decision,
        theirs=theirs,
        known=known,
    )
    if decision == "resend":
        return group
    with engine.begin() as connection:
        if decision == "received":
            reports.mark_sent(connection, [r.id for r in group], now)
            result.reported += [replace(r, sent_at=now) for r in group]
        else:
            reports.park(
                connection,
                [r.id for r in group],
                now,
                f"Stripe holds {theirs} in {minute.isoformat()}, we sent {known} and "
                f"{sum(r.value for r in group)} more whose arrival is unknown",
            )
            for report in group:
                mismatch = Mismatch(
                    report.subscription_id,
                    "report_unknown",
                    f"{report.identifier} {report.value}",
                    f"summary {theirs} in {minute.isoformat()}",
                    metric=report.metric,
                    period_start=report.period_start,
                    amount=Decimal(report.value),
                )
                reports.record_mismatch(connection, result.run_id, mismatch)
                result.mismatches.append(mismatch)
    return []


def _send(
    engine: Engine, gateway: BillingGateway, result: RunResult, report: MeterReport, now: datetime
) -> None:
    # The timestamp is fixed before the call and kept: a later check of Stripe's summary must
    # look at the minute Stripe filed the event in. Stripe takes 35 days back at most.
    timestamp = max(report.event_timestamp, now - OLDEST_TIMESTAMP)
    with engine.begin() as connection:
        reports.mark_attempt(connection, report.id, now, timestamp)
    try:
        gateway.report_meter_event(
            MeterEvent(
                event_name=report.event_name,
                customer_id=report.customer_id,
                value=report.value,
                identifier=report.identifier,
                timestamp=timestamp,
            )
        )
    except StripeRefused as exc:
        mismatch = Mismatch(
            report.subscription_id,
            "report_refused",
            f"{report.identifier} {report.value}",
            exc.message,
            metric=report.metric,
            period_start=report.period_start,
            amount=Decimal(report.value),
        )
        with engine.begin() as connection:
            reports.park(connection, [report.id], now, exc.message)
            reports.record_mismatch(connection, result.run_id, mismatch)
        result.mismatches.append(mismatch)
        log_event(logger, "meter_report_parked", level=logging.WARNING, error=exc.message)
        return
    except Exception as exc:
        with engine.begin() as connection:
            reports.mark_failed(connection, report.id, str(exc))
        raise
    with engine.begin() as connection:
        reports.mark_sent(connection, [report.id], now)
    result.reported.append(replace(report, sent_at=now, event_timestamp=timestamp))


# (6b) ------------------------------------------------------------------------------------------


def collect_invoices(
    engine: Engine,
    gateway: BillingGateway,
    result: RunResult,
    subscription_ids: Sequence[uuid.UUID] | None,
    now: datetime,
    since: datetime,
) -> None:
    """Make Stripe charge each final invoice of the horizon that it does not hold yet."""
    with engine.connect() as connection:
        pending = invoice_repository.invoices_to_collect(connection, subscription_ids, since=since)
    for found in pending:
        invoice = found.invoice
        try:
            stripe_invoice = None
            if found.stripe_invoice_id is None:
                stripe_invoice = gateway.find_invoice(str(invoice.id))
            if found.stripe_invoice_id is None and stripe_invoice is None:
                stripe_invoice = gateway.create_invoice(
                    str(invoice.id),
                    found.customer_id,
                    invoice.currency,
                    invoice_description(invoice),
                    {
                        "meterline_subscription_id": str(invoice.subscription_id),
                        "meterline_organization_id": str(invoice.organization_id),
                    },
                )
            stripe_id = found.stripe_invoice_id or (stripe_invoice.id if stripe_invoice else "")
            if found.stripe_invoice_id is None:
                with engine.begin() as connection:
                    invoice_repository.set_stripe_invoice(
                        connection,
                        invoice.id,
                        stripe_invoice_id=stripe_id,
                        status="draft",
                        total=None,
                        at=now,
                    )
            current = gateway.get_invoice(stripe_id)
            if current.status == "draft":
                present = gateway.invoice_line_ids(stripe_id)
                for item in missing_items(invoice_items(invoice), present):
                    gateway.add_invoice_item(stripe_id, found.customer_id, str(invoice.id), item)
                current = gateway.finalize_invoice(stripe_id, str(invoice.id))
        except StripeRefused as exc:
            mismatch = Mismatch(
                invoice.subscription_id,
                "invoice_refused",
                f"final {invoice.total}",
                exc.message,
                period_start=invoice.period_start,
                amount=Decimal(invoice.total),
            )
            with engine.begin() as connection:
                reports.record_mismatch(connection, result.run_id, mismatch)
            result.mismatches.append(mismatch)
            continue
        with engine.begin() as connection:
            invoice_repository.set_stripe_invoice(
                connection,
                invoice.id,
                stripe_invoice_id=stripe_id,
                status=current.status,
                total=current.total,
                at=now,
            )
        result.collected.append(replace(invoice, stripe_invoice_id=stripe_id))


# (6c) ------------------------------------------------------------------------------------------


def reconcile(
    engine: Engine,
    gateway: BillingGateway,
    result: RunResult,
    subscription_ids: Sequence[uuid.UUID],
    *,
    now: datetime,
    since: datetime,
    settle: timedelta,
) -> None:
    """Compare what Stripe holds with ours for every subscription with a Stripe customer; record
    every finding, and apply the safe fixes in the same transaction as the record."""
    with engine.connect() as connection:
        subjects = repository.reconciliation_subjects(connection, subscription_ids)
        ledgers = reports.ledger_rows(connection, [s.id for s in subjects])
        customer_reports = reports.reports_of_customers(
            connection, {s.customer_id for s in subjects}
        )
        collected = invoice_repository.collected_invoices(
            connection, [s.id for s in subjects], since=since
        )
        periods = invoice_repository.invoice_periods(connection, [s.id for s in subjects])
    by_customer: dict[str, list[MeterReport]] = defaultdict(list)
    for report in customer_reports:
        by_customer[report.customer_id].append(report)
    invoices_by_subscription = defaultdict(list)
    for invoice in collected:
        invoices_by_subscription[invoice.subscription_id].append(invoice)
    for subject in subjects:
        findings: list[Finding] = []
        if subject.stripe_subscription_id:
            theirs = gateway.get_subscription(subject.stripe_subscription_id)
            findings += subscription_findings(
                subject.id, subject.status, subject.flat_amount, subject.period, theirs
            )
        for invoice in invoices_by_subscription.get(subject.id, []):
            stripe_invoice = gateway.get_invoice(invoice.stripe_invoice_id)
            findings += invoice_findings(
                subject.id, invoice.period_start, invoice.total, stripe_invoice
            )
        own = [
            (metric, start, rows)
            for (subscription_id, metric, start), rows in sorted(ledgers.items(), key=str)
            if subscription_id == subject.id
        ]
        for usage in usage_ranges(
            subject.id,
            subject.customer_id,
            periods.get(subject.id, {}),
            own,
            by_customer.get(subject.customer_id, []),
            now=now,
            settle=now - settle,
        ):
            finding = usage_finding(
                usage,
                gateway.meter_total(usage.event_name, usage.customer_id, usage.start, usage.end),
            )
            if finding is not None:
                findings.append(finding)
        if findings:
            with engine.begin() as connection:
                for finding in findings:
                    mismatch = _apply_fix(
                        connection, subject.id, subject.customer_id, finding, ledgers, now
                    )
                    reports.record_mismatch(connection, result.run_id, mismatch)
                    result.mismatches.append(mismatch)


def _apply_fix(
    connection: Connection,
    subscription_id: uuid.UUID,
    customer_id: str,
    finding: Finding,
    ledgers: dict[reports.LedgerKey, list[MeterReport]],
    now: datetime,
) -> Mismatch:
    mismatch = finding.mismatch
    if finding.status_to is not None:
        try:
            with connection.begin_nested():
                repository.set_status(connection, subscription_id, finding.status_to)
        except IntegrityError:
            # Stripe's status would make a second live subscription of the organization.
            return replace(
                mismatch,
                resolution="not applied: the organization has another live subscription",
            )
        return replace(
            mismatch, resolved=True, resolution=f"status set to {finding.status_to} from Stripe"
        )
    if finding.restore and mismatch.metric and mismatch.period_start and finding.event_name:
        key = (subscription_id, mismatch.metric, mismatch.period_start)
        ledger = ledgers.setdefault(key, [])
        usage = UsageToReport(
            subscription_id,
            customer_id,
            mismatch.metric,
            finding.event_name,
            mismatch.period_start,
            finding.period_end or now,
            Decimal(0),
        )
        intent = plan_restore(usage, ledger, finding.restore, now)
        reports.record_intents(connection, [intent])
        ledger.append(intent)
        return replace(
            mismatch,
            resolved=True,
            resolution=f"reported {intent.value} missing units ({intent.identifier})",
        )
    return mismatch


def run_stripe_steps(
    engine: Engine,
    gateway: BillingGateway,
    result: RunResult,
    subscription_ids: Sequence[uuid.UUID] | None,
    all_ids: Sequence[uuid.UUID],
    *,
    now: datetime,
    since: datetime,
    reconcile_run: bool,
    settle: timedelta,
) -> None:
    send_reports(engine, gateway, result, subscription_ids, now)
    collect_invoices(engine, gateway, result, subscription_ids, now, since)
    if reconcile_run:
        reconcile(engine, gateway, result, all_ids, now=now, since=since, settle=settle)
        # Fixes (missing deltas) are intents too: send them in the same run.
        send_reports(engine, gateway, result, subscription_ids, now)


def report_document(report: MeterReport) -> dict[str, object]:
    return {
        "identifier": report.identifier,
        "subscription_id": str(report.subscription_id),
        "metric": report.metric,
        "event_name": report.event_name,
        "period_start": report.period_start.isoformat(),
        "kind": report.kind,
        "value": report.value,
        "cumulative": report.cumulative,
    }
