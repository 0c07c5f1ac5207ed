"""SQL of billing, set-based: subscriptions to bill, period totals from usage_records, invoices."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Connection

from shared.models import Invoice, InvoiceLine, Organization, Plan, Subscription


@dataclass(frozen=True)
class PeriodQuery:
    """Which usage to total: one subscription's organization over [start, end), for these metrics;
    `max_metrics` are totalled as the largest window (summed over projects and keys)."""

    subscription_id: uuid.UUID
    organization_id: uuid.UUID
    start: datetime
    end: datetime
    metrics: tuple[str, ...]
    max_metrics: tuple[str, ...]


def subscriptions_to_bill(
    connection: Connection, *, organization_id: uuid.UUID | None = None
) -> list[sa.Row[Any]]:
    query = (
        sa.select(
            Subscription.id,
            Subscription.organization_id,
            Subscription.status,
            Subscription.billing_interval,
            Subscription.current_period_start,
            Subscription.current_period_end,
            Subscription.billing_cycle_anchor,
            Subscription.stripe_subscription_id,
            Plan.id.label("plan_id"),
            Plan.features,
            Plan.price_monthly,
            Plan.price_yearly,
            Plan.currency,
            Organization.stripe_customer_id,
        )
        .join(Plan, Plan.id == Subscription.plan_id)
        .join(Organization, Organization.id == Subscription.organization_id)
        .order_by(Subscription.id)
    )
    if organization_id is not None:
        query = query.where(Subscription.organization_id == organization_id)
    return list(connection.execute(query))


_TOTALS = sa.text(
    """
    WITH windows AS (
        -- A "max" metric keeps one row per window (its projects and keys summed); a "sum" metric
        -- collapses to one row per period right here, which keeps the second grouping small.
        SELECT p.subscription_id, p.period_start, p.metric, p.is_max,
               CASE WHEN p.is_max THEN u.window_start END AS window_start,
               sum(u.quantity) AS quantity
        FROM billing_period_queries p
        JOIN usage_records u
          ON u.organization_id = p.organization_id AND u.metric = p.metric
         AND u.window_start >= p.period_start AND u.window_start < p.period_end
        GROUP BY 1, 2, 3, 4, 5
    )
    SELECT subscription_id, period_start, metric,
           CASE WHEN bool_or(is_max) THEN max(quantity) ELSE sum(quantity) END AS quantity
    FROM windows GROUP BY 1, 2, 3
    """
)

_BULK_ROWS = 5000
_LOAD_QUERIES = sa.text(
    """
    INSERT INTO billing_period_queries
    SELECT * FROM unnest(
        CAST(:subscription_ids AS uuid[]), CAST(:organization_ids AS uuid[]),
        CAST(:starts AS timestamptz[]), CAST(:ends AS timestamptz[]),
        CAST(:metrics AS text[]), CAST(:is_max AS boolean[])
    )
    """
)


def period_totals(
    connection: Connection, queries: Sequence[PeriodQuery]
) -> dict[uuid.UUID, dict[tuple[datetime, str], Decimal]]:
    """Per subscription, each (period start, metric)'s quantity by its aggregation.

    Runs in the caller's transaction. The periods go to an analysed temporary table first: with
    true row counts the planner hashes the periods against one scan of usage_records for a full
    run and probes the index for a small one (an unnest in the query hid the count, and a full
    run sorted 3.6M rows on disk: tests/bench/bench_billing.py measures it).
    """
    rows = [(q, metric, metric in q.max_metrics) for q in queries for metric in q.metrics]
    if not rows:
        return {}
    connection.execute(
        sa.text(
            "CREATE TEMPORARY TABLE IF NOT EXISTS billing_period_queries ("
            " subscription_id uuid, organization_id uuid, period_start timestamptz,"
            " period_end timestamptz, metric text, is_max boolean) ON COMMIT DROP"
        )
    )
    connection.execute(sa.text("SET LOCAL work_mem = '256MB'"))
    if len(rows) > _BULK_ROWS:
        # The planner takes the periods for independent of the usage they select and would probe
        # the index once per period; for a full run one scan hashed against them is ~2x faster.
        connection.execute(sa.text("SET LOCAL enable_nestloop = off"))
    connection.execute(
        _LOAD_QUERIES,
        {
            "subscription_ids": [q.subscription_id for q, _, _ in rows],
            "organization_ids": [q.organization_id for q, _, _ in rows],
            "starts": [q.start for q, _, _ in rows],
            "ends": [q.end for q, _, _ in rows],
            "metrics": [metric for _, metric, _ in rows],
            "is_max": [is_max for _, _, is_max in rows],
        },
    )
    connection.execute(sa.text("ANALYZE billing_period_queries"))
    totals: dict[uuid.UUID, dict[tuple[datetime, str], Decimal]] = {}
    for row in connection.execute(_TOTALS):
        totals.setdefault(row.subscription_id, {})[(row.period_start, row.metric)] = row.quantity
    connection.execute(sa.text("TRUNCATE billing_period_queries"))
    return totals


def invoices_of(
    connection: Connection, subscription_ids: Iterable[uuid.UUID], *, since: datetime
) -> dict[uuid.UUID, list[dict[str, Any]]]:
    """Each subscription's invoices that are draft or ended after `since`, with their lines."""
    ids = list(subscription_ids)
    if not ids:
        return {}
    invoices = connection.execute(
        sa.select(Invoice)
        .where(Invoice.subscription_id.in_(ids))
        .where(sa.or_(Invoice.status == "draft", Invoice.period_end > since))
        .order_by(Invoice.subscription_id, Invoice.period_start)
    ).mappings()
    by_id: dict[uuid.UUID, dict[str, Any]] = {}
    result: dict[uuid.UUID, list[dict[str, Any]]] = {}
    for invoice in invoices:
        document = dict(invoice) | {"lines": []}
        by_id[invoice["id"]] = document
        result.setdefault(invoice["subscription_id"], []).append(document)
    if by_id:
        lines = connection.execute(
            sa.select(InvoiceLine)
            .where(InvoiceLine.invoice_id.in_(list(by_id)))
            .order_by(InvoiceLine.invoice_id, InvoiceLine.kind.desc(), InvoiceLine.metric)
        ).mappings()
        for line in lines:
            by_id[line["invoice_id"]]["lines"].append(dict(line))
    return result


def save_invoices(connection: Connection, invoices: list[dict[str, Any]]) -> None:
    """Insert or update invoices (by subscription and period) and replace their lines, in three
    set-based statements whatever the number of invoices."""
    if not invoices:
        return
    statement = pg.insert(Invoice)
    statement = statement.on_conflict_do_update(
        index_elements=[Invoice.subscription_id, Invoice.period_start],
        set_={
            "status": statement.excluded.status,
            "period_end": statement.excluded.period_end,
            "flat_amount": statement.excluded.flat_amount,
            "total": statement.excluded.total,
            "finalized_at": statement.excluded.finalized_at,
            "updated_at": sa.func.now(),
        },
    )
    connection.execute(
        statement,
        [
            {"id": invoice["id"], **{k: invoice[k] for k in _INVOICE_COLUMNS}}
            for invoice in invoices
        ],
    )
    ids = [invoice["id"] for invoice in invoices]
    connection.execute(sa.delete(InvoiceLine).where(InvoiceLine.invoice_id.in_(ids)))
    lines = [
        {"id": uuid.uuid4(), "invoice_id": invoice["id"], **{k: line[k] for k in _LINE_COLUMNS}}
        for invoice in invoices
        for line in invoice["lines"]
    ]
    if lines:
        connection.execute(sa.insert(InvoiceLine), lines)


_INVOICE_COLUMNS = (
    "organization_id",
    "subscription_id",
    "period_start",
    "period_end",
    "currency",
    "status",
    "flat_amount",
    "total",
    "finalized_at",
)
_LINE_COLUMNS = (
    "metric",
    "kind",
    "quantity",
    "billable_quantity",
    "amount",
    "adjusts_period_start",
)


def advance_periods(
    connection: Connection, periods: list[tuple[uuid.UUID, datetime, datetime]]
) -> None:
    """Move subscriptions to their new current period: (subscription id, start, end) each."""
    if not periods:
        return
    connection.execute(
        sa.text(
            "UPDATE subscriptions AS s SET current_period_start = p.start,"
            " current_period_end = p.end_, updated_at = now()"
            " FROM unnest(CAST(:ids AS uuid[]), CAST(:starts AS timestamptz[]),"
            "             CAST(:ends AS timestamptz[])) AS p(id, start, end_)"
            " WHERE s.id = p.id"
        ),
        {
            "ids": [p[0] for p in periods],
            "starts": [p[1] for p in periods],
            "ends": [p[2] for p in periods],
        },
    )


def customers_of(connection: Connection, organization_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    rows = connection.execute(
        sa.select(Organization.id, Organization.stripe_customer_id)
        .where(Organization.id.in_(organization_ids))
        .where(Organization.stripe_customer_id.is_not(None))
    )
    return {row.id: row.stripe_customer_id for row in rows}
