"""SQL of billing, set-based: subscriptions to bill, period totals from usage_records, invoices."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Connection

from services.billing.invoices import LINE_FIELDS
from shared.models import BillingRun, Invoice, InvoiceLine, Organization, Plan, Subscription


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
            Subscription.cancel_at_period_end,
            Subscription.trial_end,
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


# The periods of a run go to tables of their own, created (and dropped) inside the run's
# transaction: analysed, so the planner sees true row counts (an unnest hid them), and not
# TEMPORARY, because parallel workers cannot read a temporary table. UNLOGGED: they never outlive
# the transaction, and no one else can see them before it commits (they never do).
#
# A period is read in two parts: its whole UTC days from usage_daily (the exact daily rollup of
# usage_records, 24 times fewer rows for hourly windows), and its partial edge days, if its
# boundaries are not midnights, window by window from usage_records. A window belongs to the day
# of its start, as it belongs to the period its start falls in.
_PERIODS = "billing_periods_{token}"
_EDGES = "billing_period_edges_{token}"
_CREATE_PERIODS = (
    "CREATE UNLOGGED TABLE {table} (pid integer, organization_id uuid, day_from date, day_to date)"
)
_CREATE_EDGES = (
    "CREATE UNLOGGED TABLE {table} (pid integer, organization_id uuid,"
    " edge_start timestamptz, edge_end timestamptz)"
)
_LOAD_PERIODS = (
    "INSERT INTO {table} SELECT * FROM unnest(CAST(:pids AS integer[]),"
    " CAST(:organization_ids AS uuid[]), CAST(:day_froms AS date[]),"
    " CAST(:day_tos AS date[]))"
)
_LOAD_EDGES = (
    "INSERT INTO {table} SELECT * FROM unnest(CAST(:pids AS integer[]),"
    " CAST(:organization_ids AS uuid[]), CAST(:starts AS timestamptz[]),"
    " CAST(:ends AS timestamptz[]))"
)
# "sum" totals: the whole days' sums plus the edge windows, grouped by the period's integer id
# and the metric only. Edges are read by a LATERAL subquery kept apart by OFFSET 0, so each edge
# (hours of one organization) probes the (organization_id, window_start) index: a join the
# planner may flatten could hash all of usage_records instead, the cost the rollup removes.
# Joined on the organization alone (not organization and metric), every period of a plan gets
# all its metrics in one probe; metrics a plan does not price are dropped by the caller. Every
# window size counts, as every usage_records row in the period does.
_SUM_TOTALS = (
    "SELECT pid, metric, sum(quantity) AS quantity FROM ("
    " SELECT p.pid, d.metric, d.quantity FROM {periods} p"
    " JOIN usage_daily d ON d.organization_id = p.organization_id"
    " AND d.day >= p.day_from AND d.day < p.day_to"
    " UNION ALL"
    " SELECT e.pid, u.metric, u.quantity FROM {edges} e CROSS JOIN LATERAL ("
    " SELECT metric, quantity FROM usage_records WHERE organization_id = e.organization_id"
    " AND window_start >= e.edge_start AND window_start < e.edge_end OFFSET 0) AS u"
    ") AS parts GROUP BY pid, metric"
)
# "max" totals: the largest window, each window summed over its projects and keys first, and
# (as the windows are grouped by their start alone) over the window sizes that share a start. A
# whole day with one window size has its largest window in usage_daily; a day with several sizes
# (a window-size change) may have windows of different sizes sharing a start, so it is read
# window by window from usage_records, like the edges. Only the metrics some plan aggregates by
# max are read.
_MAX_TOTALS = (
    "WITH days AS ("
    " SELECT p.pid, p.organization_id, d.metric, d.day, count(*) AS window_sizes,"
    " max(d.max_window_quantity) AS quantity FROM {periods} p"
    " JOIN usage_daily d ON d.organization_id = p.organization_id"
    " AND d.day >= p.day_from AND d.day < p.day_to"
    " WHERE d.metric = ANY(CAST(:metrics AS text[]))"
    " GROUP BY p.pid, p.organization_id, d.metric, d.day),"
    " ranges AS ("
    " SELECT e.pid, e.organization_id, m.metric, e.edge_start AS range_start,"
    " e.edge_end AS range_end FROM {edges} e"
    " CROSS JOIN unnest(CAST(:metrics AS text[])) AS m(metric)"
    " UNION ALL"
    " SELECT pid, organization_id, metric, CAST(day AS timestamp) AT TIME ZONE 'UTC',"
    " CAST(day + 1 AS timestamp) AT TIME ZONE 'UTC' FROM days WHERE window_sizes > 1),"
    " windows AS ("
    " SELECT r.pid, r.metric, sum(u.quantity) AS quantity FROM ranges r CROSS JOIN LATERAL ("
    " SELECT window_start, quantity FROM usage_records WHERE organization_id = r.organization_id"
    " AND metric = r.metric AND window_start >= r.range_start AND window_start < r.range_end"
    " OFFSET 0) AS u"
    " GROUP BY r.pid, r.metric, u.window_start)"
    " SELECT pid, metric, max(quantity) AS quantity FROM ("
    " SELECT pid, metric, quantity FROM days WHERE window_sizes = 1"
    " UNION ALL SELECT pid, metric, quantity FROM windows) AS parts"
    " GROUP BY pid, metric"
)
# Above this many periods a run is "full" (tests/bench/bench_billing.py).
_BULK_PERIODS = 1000
_FULL_RUN_SETTINGS = (
    # Parallel query: with the parallel costs at zero each worker joins and partially aggregates
    # its share of the days instead of gathering every row to one process first.
    "SET LOCAL max_parallel_workers_per_gather = 2",
    "SET LOCAL parallel_setup_cost = 0",
    "SET LOCAL parallel_tuple_cost = 0",
    # Compiling the expressions costs more than it saves on these plans (measured).
    "SET LOCAL jit = off",
)


@dataclass(frozen=True)
class StagedPeriods:
    """The names of a run's period tables: `periods` (whole days) and `edges` (partial days)."""

    periods: str
    edges: str


@dataclass(frozen=True)
class _PeriodParts:
    day_from: date
    day_to: date
    edges: tuple[tuple[datetime, datetime], ...]


def _period_parts(start: datetime, end: datetime) -> _PeriodParts:
    """Split [start, end) into its whole UTC days [day_from, day_to) and the partial days at
    its edges (none when a boundary is a midnight; the whole period when it has no whole day)."""
    first = start.astimezone(UTC)
    day_from = first.date() if first.time() == time.min else first.date() + timedelta(days=1)
    day_to = end.astimezone(UTC).date()
    if day_from >= day_to:
        return _PeriodParts(day_from, day_from, ((start, end),) if start < end else ())
    whole_start = datetime.combine(day_from, time.min, UTC)
    whole_end = datetime.combine(day_to, time.min, UTC)
    edges = tuple(
        (edge_start, edge_end)
        for edge_start, edge_end in ((start, whole_start), (whole_end, end))
        if edge_start < edge_end
    )
    return _PeriodParts(day_from, day_to, edges)


def stage_periods(connection: Connection, queries: Sequence[PeriodQuery]) -> StagedPeriods:
    """Load the periods (numbered by their position in `queries`) into tables of this
    transaction, set the transaction up for their size, and return the tables' names."""
    token = uuid.uuid4().hex[:12]
    staged = StagedPeriods(_PERIODS.format(token=token), _EDGES.format(token=token))
    connection.execute(sa.text("SET LOCAL work_mem = '256MB'"))
    if len(queries) > _BULK_PERIODS:
        for setting in _FULL_RUN_SETTINGS:
            connection.execute(sa.text(setting))
    parts = [_period_parts(q.start, q.end) for q in queries]
    connection.execute(sa.text(_CREATE_PERIODS.format(table=staged.periods)))
    connection.execute(
        sa.text(_LOAD_PERIODS.format(table=staged.periods)),
        {
            "pids": list(range(len(queries))),
            "organization_ids": [q.organization_id for q in queries],
            "day_froms": [p.day_from for p in parts],
            "day_tos": [p.day_to for p in parts],
        },
    )
    edges = [
        (pid, query.organization_id, edge)
        for pid, (query, part) in enumerate(zip(queries, parts, strict=True))
        for edge in part.edges
    ]
    connection.execute(sa.text(_CREATE_EDGES.format(table=staged.edges)))
    connection.execute(
        sa.text(_LOAD_EDGES.format(table=staged.edges)),
        {
            "pids": [pid for pid, _, _ in edges],
            "organization_ids": [organization_id for _, organization_id, _ in edges],
            "starts": [edge[0] for _, _, edge in edges],
            "ends": [edge[1] for _, _, edge in edges],
        },
    )
    connection.execute(sa.text(f"ANALYZE {staged.periods}"))
    connection.execute(sa.text(f"ANALYZE {staged.edges}"))
    return staged


def drop_periods(connection: Connection, staged: StagedPeriods) -> None:
    connection.execute(sa.text(f"DROP TABLE {staged.periods}, {staged.edges}"))


def period_totals(
    connection: Connection, queries: Sequence[PeriodQuery]
) -> dict[uuid.UUID, dict[tuple[datetime, str], Decimal]]:
    """Per subscription, each (period start, metric)'s quantity by its aggregation.

    Runs in the caller's transaction (the periods' tables are dropped before it returns).
    """
    queries = [q for q in queries if q.metrics]
    if not queries:
        return {}
    staged = stage_periods(connection, queries)
    tables = {"periods": staged.periods, "edges": staged.edges}
    found = {
        (row.pid, row.metric): row.quantity
        for row in connection.execute(sa.text(_SUM_TOTALS.format(**tables)))
    }
    maxima: dict[tuple[int, str], Decimal] = {}
    max_metrics = sorted({metric for q in queries for metric in q.max_metrics})
    if max_metrics:
        rows = connection.execute(sa.text(_MAX_TOTALS.format(**tables)), {"metrics": max_metrics})
        maxima = {(row.pid, row.metric): row.quantity for row in rows}
    drop_periods(connection, staged)
    totals: dict[uuid.UUID, dict[tuple[datetime, str], Decimal]] = {}
    for pid, query in enumerate(queries):
        for metric in query.metrics:
            source = maxima if metric in query.max_metrics else found
            quantity = source.get((pid, metric))
            if quantity is not None:
                totals.setdefault(query.subscription_id, {})[(query.start, metric)] = quantity
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


def final_periods(
    connection: Connection, periods: Sequence[tuple[uuid.UUID, datetime]]
) -> set[tuple[uuid.UUID, datetime]]:
    """Which of these (subscription id, period start) already have a final invoice."""
    if not periods:
        return set()
    rows = connection.execute(
        sa.text(
            "SELECT i.subscription_id, i.period_start FROM invoices AS i"
            " JOIN unnest(CAST(:ids AS uuid[]), CAST(:starts AS timestamptz[])) AS p(id, start)"
            " ON i.subscription_id = p.id AND i.period_start = p.start"
            " WHERE i.status = 'final'"
        ),
        {"ids": [p[0] for p in periods], "starts": [p[1] for p in periods]},
    )
    return {(row.subscription_id, row.period_start) for row in rows}


def save_invoices(connection: Connection, invoices: list[dict[str, Any]]) -> None:
    """Insert new invoices and update drafts (by subscription and period), and replace the lines
    of those written, in three set-based statements whatever the number of invoices.

    A final invoice is never changed here: the update is conditional on the stored row being a
    draft, and lines are written under the id the database returns for each row it wrote (an
    existing draft keeps its id), so lines can never point at an id that was not stored.
    """
    if not invoices:
        return
    insert = pg.insert(Invoice)
    statement = insert.on_conflict_do_update(
        index_elements=[Invoice.subscription_id, Invoice.period_start],
        set_={
            "status": insert.excluded.status,
            "period_end": insert.excluded.period_end,
            "flat_amount": insert.excluded.flat_amount,
            "total": insert.excluded.total,
            "finalized_at": insert.excluded.finalized_at,
            "plan_snapshot": insert.excluded.plan_snapshot,
            "updated_at": sa.func.now(),
        },
        where=Invoice.status == "draft",
    ).returning(Invoice.id, Invoice.subscription_id, Invoice.period_start)
    written = {
        (row.subscription_id, row.period_start): row.id
        for row in connection.execute(
            statement,
            [
                {"id": invoice["id"], **{k: invoice[k] for k in _INVOICE_COLUMNS}}
                for invoice in invoices
            ],
        )
    }
    if not written:
        return
    connection.execute(
        sa.delete(InvoiceLine).where(InvoiceLine.invoice_id.in_(list(written.values())))
    )
    lines = [
        {"id": uuid.uuid4(), "invoice_id": invoice_id, **{k: line[k] for k in LINE_FIELDS}}
        for invoice in invoices
        if (invoice_id := written.get((invoice["subscription_id"], invoice["period_start"])))
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
    "plan_snapshot",
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


def cancel_subscriptions(
    connection: Connection, canceled: list[tuple[uuid.UUID, datetime]]
) -> None:
    """Mark subscriptions canceled: (subscription id, canceled at) each."""
    if not canceled:
        return
    connection.execute(
        sa.text(
            "UPDATE subscriptions AS s SET status = 'canceled', canceled_at = c.at,"
            " cancel_at_period_end = false, updated_at = now()"
            " FROM unnest(CAST(:ids AS uuid[]), CAST(:ats AS timestamptz[])) AS c(id, at)"
            " WHERE s.id = c.id"
        ),
        {"ids": [c[0] for c in canceled], "ats": [c[1] for c in canceled]},
    )


def customers_of(connection: Connection, organization_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    rows = connection.execute(
        sa.select(Organization.id, Organization.stripe_customer_id)
        .where(Organization.id.in_(organization_ids))
        .where(Organization.stripe_customer_id.is_not(None))
    )
    return {row.id: row.stripe_customer_id for row in rows}


def organization_of(connection: Connection, organization_id: uuid.UUID) -> Any:
    """The organization's name and Stripe customer id."""
    return connection.execute(
        sa.select(Organization.name, Organization.stripe_customer_id).where(
            Organization.id == organization_id
        )
    ).one()


def plan_prices_of(connection: Connection, plan_id: uuid.UUID) -> Any:
    """The plan's name and Stripe price ids."""
    return connection.execute(
        sa.select(Plan.name, Plan.stripe_price_id_monthly, Plan.stripe_price_id_yearly).where(
            Plan.id == plan_id
        )
    ).one()


def stripe_subscription_of(connection: Connection, subscription_id: uuid.UUID) -> str | None:
    return connection.execute(
        sa.select(Subscription.stripe_subscription_id).where(Subscription.id == subscription_id)
    ).scalar_one()


def set_stripe_customer(
    connection: Connection, organization_id: uuid.UUID, customer_id: str
) -> None:
    connection.execute(
        sa.update(Organization)
        .where(Organization.id == organization_id)
        .values(stripe_customer_id=customer_id)
    )


def set_stripe_price(
    connection: Connection, plan_id: uuid.UUID, column: str, price_id: str
) -> None:
    """Store a plan's Stripe price id in `column` (stripe_price_id_monthly or _yearly)."""
    connection.execute(sa.update(Plan).where(Plan.id == plan_id).values({column: price_id}))


def link_subscription(
    connection: Connection,
    subscription_id: uuid.UUID,
    stripe_subscription_id: str,
    customer_id: str,
) -> None:
    connection.execute(
        sa.update(Subscription)
        .where(Subscription.id == subscription_id)
        .values(stripe_subscription_id=stripe_subscription_id, stripe_customer_id=customer_id)
    )


def start_run(connection: Connection, as_of: datetime) -> uuid.UUID:
    """Record a billing run as running; returns its id."""
    run_id = uuid.uuid4()
    connection.execute(
        sa.insert(BillingRun).values(id=run_id, as_of=as_of, dry_run=False, status="running")
    )
    return run_id


def finish_run(
    connection: Connection,
    run_id: uuid.UUID,
    *,
    status: str,
    error: str | None,
    subscriptions: int,
    invoices_changed: int,
    reported: int,
    mismatches: int,
) -> None:
    connection.execute(
        sa.update(BillingRun)
        .where(BillingRun.id == run_id)
        .values(
            status=status,
            finished_at=sa.func.now(),
            subscriptions=subscriptions,
            invoices_changed=invoices_changed,
            reported=reported,
            mismatches=mismatches,
            error=error,
        )
    )
