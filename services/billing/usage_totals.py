"""SQL of a billing run's usage totals: each segment [start, end) of each period, set-based.

The rule (README, "Which period an event is billed in"): an event is billed in the segment its
timestamp falls in. A segment's total is
    the windows that start in [start, end)            (usage_daily for whole UTC days, windows
                                                       of usage_records for the partial edge days)
  + the part of start's window at or after start      (its usage cut, shared.usage_cuts)
  - the part of end's window at or after end          (its usage cut)
so a window cut by a boundary is shared between the two sides exactly, and a boundary on the
window grid (a cut with no part) changes nothing. For "max" metrics the cut windows enter the
maximum as their in-segment parts.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.billing.pricing import PricedFilter
from shared.db import array_literal
from shared.events import SUM_CONTEXT, window_start
from shared.usage_cuts import Cut, CutPart


@dataclass(frozen=True)
class SegmentQuery:
    """Which usage to total: one organization over [start, end), for these metrics;
    `max_metrics` are totalled as the largest window (summed over projects and keys)."""

    organization_id: uuid.UUID
    start: datetime
    end: datetime
    metrics: tuple[str, ...]
    max_metrics: tuple[str, ...]
    # Prices per dimension filter (services/billing/filter_totals.py totals them).
    filters: tuple[PricedFilter, ...] = ()

    @property
    def cuts(self) -> tuple[Cut, Cut]:
        return Cut(self.organization_id, self.start), Cut(self.organization_id, self.end)


CutParts = Mapping[Cut, tuple[CutPart, ...]]

# The segments of a run go to tables of their own, created (and dropped) inside the run's
# transaction: analysed, so the planner sees true row counts (an unnest hid them), and not
# TEMPORARY, because parallel workers cannot read a temporary table. UNLOGGED: they never outlive
# the transaction, and no one else can see them before it commits (they never do).
#
# A segment is read in two parts: its whole UTC days from usage_daily (the exact daily rollup of
# usage_records, 24 times fewer rows for hourly windows), and its partial edge days, if its
# boundaries are not midnights, window by window from usage_records. A window belongs to the day
# of its start (window sizes divide a day, so no window straddles a midnight).
_PERIODS = "billing_periods_{token}"
_EDGES = "billing_period_edges_{token}"
_CREATE_PERIODS = (
    "CREATE UNLOGGED TABLE {table} (pid integer, organization_id uuid, day_from date,"
    " day_to date, period_end timestamptz)"
)
_CREATE_EDGES = (
    "CREATE UNLOGGED TABLE {table} (pid integer, organization_id uuid,"
    " edge_start timestamptz, edge_end timestamptz)"
)
_LOAD_PERIODS = (
    "INSERT INTO {table} SELECT * FROM unnest(CAST(:pids AS integer[]),"
    " CAST(:organization_ids AS uuid[]), CAST(:day_froms AS date[]),"
    " CAST(:day_tos AS date[]), CAST(:ends AS timestamptz[]))"
)
_LOAD_EDGES = (
    "INSERT INTO {table} SELECT * FROM unnest(CAST(:pids AS integer[]),"
    " CAST(:organization_ids AS uuid[]), CAST(:starts AS timestamptz[]),"
    " CAST(:ends AS timestamptz[]))"
)
# "sum" totals of the windows that start in each segment: the whole days' sums plus the edge
# windows, grouped by the segment's integer id and the metric only. Edges are read by a LATERAL
# subquery kept apart by OFFSET 0, so each edge (hours of one organization) probes the
# (organization_id, window_start) index: a join the planner may flatten could hash all of
# usage_records instead, the cost the rollup removes. Joined on the organization alone (not
# organization and metric), every segment of a plan gets all its metrics in one probe; metrics a
# plan does not price are dropped by the caller. Every window size counts.
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
# "max" totals: the largest window, each window summed over its projects and keys first, and (as
# the windows are grouped by their start alone) over the window sizes that share a start. A whole
# day with one window size has its largest window in usage_daily; a day with several sizes (a
# window-size change) may have windows of different sizes sharing a start, so it is read window by
# window from usage_records, like the edges. A window that straddles the segment's end (it starts
# inside, ends after) is returned on its own with its sizes (`straddles`), for the caller to take
# away its part after the end. Only the metrics some plan aggregates by max are read.
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
    " SELECT r.pid, r.metric, sum(u.quantity) AS quantity,"
    " array_agg(DISTINCT u.window_seconds) AS sizes,"
    " max(u.window_start + make_interval(secs => u.window_seconds)) AS window_end"
    " FROM ranges r CROSS JOIN LATERAL ("
    " SELECT window_start, window_seconds, quantity FROM usage_records"
    " WHERE organization_id = r.organization_id"
    " AND metric = r.metric AND window_start >= r.range_start AND window_start < r.range_end"
    " OFFSET 0) AS u"
    " GROUP BY r.pid, r.metric, u.window_start),"
    " classified AS ("
    " SELECT w.pid, w.metric, w.quantity,"
    " CASE WHEN w.window_end > p.period_end THEN w.sizes END AS straddles"
    " FROM windows w JOIN {periods} p ON p.pid = w.pid)"
    " SELECT pid, metric, max(quantity) AS quantity, NULL AS straddles FROM ("
    " SELECT pid, metric, quantity FROM days WHERE window_sizes = 1"
    " UNION ALL SELECT pid, metric, quantity FROM classified WHERE straddles IS NULL) AS parts"
    " GROUP BY pid, metric"
    " UNION ALL SELECT pid, metric, quantity, straddles FROM classified"
    " WHERE straddles IS NOT NULL"
)
# Above this many segments a run is "full" (tests/bench/bench_billing.py).
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
    """The names of a run's segment tables: `periods` (whole days) and `edges` (partial days)."""

    periods: str
    edges: str


@dataclass(frozen=True)
class _PeriodParts:
    day_from: date
    day_to: date
    edges: tuple[tuple[datetime, datetime], ...]


def _period_parts(start: datetime, end: datetime) -> _PeriodParts:
    """Split [start, end) into its whole UTC days [day_from, day_to) and the partial days at
    its edges (none when a boundary is a midnight; the whole segment when it has no whole day)."""
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


def stage_periods(connection: Connection, queries: Sequence[SegmentQuery]) -> StagedPeriods:
    """Load the segments (numbered by their position in `queries`) into tables of this
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
            "pids": array_literal(range(len(queries))),
            "organization_ids": array_literal(q.organization_id for q in queries),
            "day_froms": array_literal(p.day_from for p in parts),
            "day_tos": array_literal(p.day_to for p in parts),
            "ends": array_literal(q.end for q in queries),
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
            "pids": array_literal(pid for pid, _, _ in edges),
            "organization_ids": array_literal(organization_id for _, organization_id, _ in edges),
            "starts": array_literal(edge[0] for _, _, edge in edges),
            "ends": array_literal(edge[1] for _, _, edge in edges),
        },
    )
    connection.execute(sa.text(f"ANALYZE {staged.periods}"))
    connection.execute(sa.text(f"ANALYZE {staged.edges}"))
    return staged


def drop_periods(connection: Connection, staged: StagedPeriods) -> None:
    connection.execute(sa.text(f"DROP TABLE {staged.periods}, {staged.edges}"))


def segment_totals(
    connection: Connection, queries: Sequence[SegmentQuery], cut_parts: CutParts
) -> list[dict[str, Decimal]]:
    """For each query (same order), each metric's quantity by its aggregation; a metric without
    usage is absent. `cut_parts` holds the parts of the queries' boundaries that split a window
    (shared.usage_cuts; a boundary without parts splits nothing).

    Runs in the caller's transaction (the segments' tables are dropped before it returns).
    """
    totals: list[dict[str, Decimal]] = [{} for _ in queries]
    wanted = [pid for pid, q in enumerate(queries) if q.metrics and q.start < q.end]
    if not wanted:
        return totals
    staged_queries = [queries[pid] for pid in wanted]
    staged = stage_periods(connection, staged_queries)
    tables = {"periods": staged.periods, "edges": staged.edges}
    sums = {
        (row.pid, row.metric): Decimal(row.quantity)
        for row in connection.execute(sa.text(_SUM_TOTALS.format(**tables)))
    }
    maxima: dict[int, dict[str, list[tuple[Decimal, list[int] | None]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    max_metrics = sorted({metric for q in staged_queries for metric in q.max_metrics})
    if max_metrics:
        rows = connection.execute(sa.text(_MAX_TOTALS.format(**tables)), {"metrics": max_metrics})
        for row in rows:
            maxima[row.pid][row.metric].append((Decimal(row.quantity), row.straddles))
    drop_periods(connection, staged)
    for index, pid in enumerate(wanted):
        query = queries[pid]
        start_parts = _parts_by_metric(cut_parts.get(query.cuts[0], ()))
        end_parts = _parts_by_metric(cut_parts.get(query.cuts[1], ()))
        for metric in query.metrics:
            if metric in query.max_metrics:
                found = _largest(
                    query,
                    maxima[index].get(metric, []),
                    start_parts.get(metric, {}),
                    end_parts.get(metric, {}),
                )
            else:
                found = _sum(
                    sums.get((index, metric)),
                    start_parts.get(metric, {}),
                    end_parts.get(metric, {}),
                )
            if found is not None:
                totals[pid][metric] = found
    return totals


def _parts_by_metric(parts: Sequence[CutPart]) -> dict[str, dict[int, Decimal]]:
    found: dict[str, dict[int, Decimal]] = defaultdict(dict)
    for part in parts:
        found[part.metric][part.window_seconds] = part.quantity
    return found


def _sum(
    windows: Decimal | None, after_start: Mapping[int, Decimal], after_end: Mapping[int, Decimal]
) -> Decimal | None:
    """The windows starting in the segment, plus the start window's part after the start, minus
    the end window's part after the end."""
    if windows is None and not after_start and not after_end:
        return None
    total = windows or Decimal(0)
    for quantity in after_start.values():
        total = SUM_CONTEXT.add(total, quantity)
    for quantity in after_end.values():
        total = SUM_CONTEXT.subtract(total, quantity)
    return total


def _largest(
    query: SegmentQuery,
    rows: Sequence[tuple[Decimal, list[int] | None]],
    after_start: Mapping[int, Decimal],
    after_end: Mapping[int, Decimal],
) -> Decimal | None:
    """The largest window of the segment, with the windows its boundaries cut counted as their
    parts inside it."""
    candidates = [quantity for quantity, straddles in rows if straddles is None]
    for quantity, straddles in rows:
        if straddles is not None:
            after = Decimal(0)
            for size in straddles:
                after = SUM_CONTEXT.add(after, after_end.get(size, Decimal(0)))
            candidates.append(SUM_CONTEXT.subtract(quantity, after))
    for size, quantity in after_start.items():
        same_window = window_start(query.start, size) == window_start(query.end, size)
        inside = quantity
        if same_window:
            inside = SUM_CONTEXT.subtract(quantity, after_end.get(size, Decimal(0)))
        candidates.append(inside)
    return max(candidates) if candidates else None
