"""SQL of invoices: loading them with their lines and pricing, saving them (COPY-staged), listing
them, and the Stripe invoices that collect them. Every function takes a Connection inside the
caller's transaction; none commits."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.billing.invoices import Invoice, InvoiceLine, InvoiceStatus, LineKind
from services.billing.terms import InvoicePricing, canonical_metered, iso, referenced_versions
from shared.db import array_literal, in_array
from shared.models import Invoice as InvoiceRow
from shared.models import InvoiceLine as InvoiceLineRow
from shared.models import Organization, PlanVersion

_INVOICE_COLUMNS = (
    InvoiceRow.id,
    InvoiceRow.organization_id,
    InvoiceRow.subscription_id,
    InvoiceRow.period_start,
    InvoiceRow.period_end,
    InvoiceRow.currency,
    InvoiceRow.status,
    InvoiceRow.flat_amount,
    InvoiceRow.total,
    InvoiceRow.finalized_at,
    InvoiceRow.plan_snapshot,
    InvoiceRow.stripe_invoice_id,
    InvoiceRow.stripe_status,
    InvoiceRow.stripe_total,
    # As text, parsed by msgspec: several times faster than the driver's json for many lines.
    sa.cast(InvoiceRow.lines, sa.Text),
)


def _time(value: object) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


# A stored line: usage lines name their segment by its position in the invoice's pricing (the
# segment's bounds are there), the others keep their instants.
def _line(raw: dict[str, Any], pricing: InvoicePricing | None) -> InvoiceLine:
    segment = raw.get("segment")
    if segment is not None and pricing is not None and segment < len(pricing.segments):
        terms = pricing.segments[segment]
        start, end = terms.start, terms.end
    else:
        start, end = _time(raw.get("segment_start")), _time(raw.get("segment_end"))
    return InvoiceLine(
        kind=cast(LineKind, raw["kind"]),
        metric=raw.get("metric"),
        quantity=Decimal(raw["quantity"]),
        billable_quantity=Decimal(raw["billable_quantity"]),
        amount=int(raw["amount"]),
        adjusts_period_start=_time(raw.get("adjusts_period_start")),
        segment_start=start,
        segment_end=end,
        description=raw.get("description") or "",
    )


def _line_document(line: InvoiceLine, segments: dict[datetime, int]) -> dict[str, object]:
    document: dict[str, object] = {
        "kind": line.kind,
        "metric": line.metric,
        "quantity": str(line.quantity),
        "billable_quantity": str(line.billable_quantity),
        "amount": line.amount,
    }
    position = (
        segments.get(line.segment_start) if line.kind == "usage" and line.segment_start else None
    )
    if position is not None:
        document["segment"] = position
    else:
        for name in ("segment_start", "segment_end"):
            moment = getattr(line, name)
            if moment is not None:
                document[name] = iso(moment)
    if line.adjusts_period_start is not None:
        document["adjusts_period_start"] = iso(line.adjusts_period_start)
    if line.description:
        document["description"] = line.description
    return document


def _legacy_lines(
    connection: Connection, invoice_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[InvoiceLine]]:
    """Lines the first release kept in invoice_lines, for invoices without `lines`."""
    found: dict[uuid.UUID, list[InvoiceLine]] = defaultdict(list)
    if invoice_ids:
        rows = connection.execute(
            sa.select(
                InvoiceLineRow.invoice_id,
                InvoiceLineRow.kind,
                InvoiceLineRow.metric,
                InvoiceLineRow.quantity,
                InvoiceLineRow.billable_quantity,
                InvoiceLineRow.amount,
                InvoiceLineRow.adjusts_period_start,
            )
            .where(InvoiceLineRow.invoice_id.in_(invoice_ids))
            .order_by(InvoiceLineRow.kind.desc(), InvoiceLineRow.metric)
        )
        for invoice_id, kind, metric, quantity, billable, amount, adjusts in rows:
            found[invoice_id].append(
                InvoiceLine(
                    cast(LineKind, kind),
                    metric,
                    Decimal(quantity),
                    Decimal(billable),
                    int(amount),
                    adjusts_period_start=adjusts,
                )
            )
    return found


def _version_prices(connection: Connection, ids: set[uuid.UUID]) -> dict[uuid.UUID, str]:
    if not ids:
        return {}
    rows = connection.execute(
        sa.select(PlanVersion.id, PlanVersion.features).where(PlanVersion.id.in_(ids))
    )
    return {version_id: canonical_metered(features) for version_id, features in rows}


def _invoices(connection: Connection, where: sa.ColumnElement[bool]) -> list[Invoice]:
    rows = connection.execute(
        sa.select(*_INVOICE_COLUMNS)
        .where(where)
        .order_by(InvoiceRow.subscription_id, InvoiceRow.period_start)
    ).all()
    legacy = _legacy_lines(connection, [row[0] for row in rows if row[14] is None])
    versions = _version_prices(connection, referenced_versions(row[10] for row in rows))
    invoices = []
    for row in rows:
        pricing = InvoicePricing.from_json(row[10], row[3], row[4], versions)
        invoices.append(
            Invoice(
                id=row[0],
                organization_id=row[1],
                subscription_id=row[2],
                period_start=row[3],
                period_end=row[4],
                currency=row[5],
                status=cast(InvoiceStatus, row[6]),
                flat_amount=int(row[7]),
                total=int(row[8]),
                finalized_at=row[9],
                pricing=pricing,
                lines=tuple(_line(raw, pricing) for raw in msgspec.json.decode(row[14]))
                if row[14] is not None
                else tuple(legacy.get(row[0], ())),
                stripe_invoice_id=row[11],
                stripe_status=row[12],
                stripe_total=row[13],
            )
        )
    return invoices


def invoices_of(
    connection: Connection, subscription_ids: Sequence[uuid.UUID], *, since: datetime
) -> dict[uuid.UUID, list[Invoice]]:
    """Each subscription's invoices that are draft or ended after `since`, with their lines."""
    if not subscription_ids:
        return {}
    found: dict[uuid.UUID, list[Invoice]] = defaultdict(list)
    for invoice in _invoices(
        connection,
        sa.and_(
            in_array(InvoiceRow.subscription_id, subscription_ids, sa.Uuid),
            sa.or_(InvoiceRow.status == "draft", InvoiceRow.period_end > since),
        ),
    ):
        found[invoice.subscription_id].append(invoice)
    return dict(found)


def invoice_by_id(connection: Connection, invoice_id: uuid.UUID) -> Invoice | None:
    found = _invoices(connection, InvoiceRow.id == invoice_id)
    return found[0] if found else None


def list_invoices(
    connection: Connection,
    *,
    organization_id: uuid.UUID | None = None,
    subscription_id: uuid.UUID | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[Invoice]:
    """Invoices, newest period first, filtered."""
    query = sa.select(InvoiceRow.id).order_by(InvoiceRow.period_start.desc()).limit(limit)
    if organization_id is not None:
        query = query.where(InvoiceRow.organization_id == organization_id)
    if subscription_id is not None:
        query = query.where(InvoiceRow.subscription_id == subscription_id)
    if status is not None:
        query = query.where(InvoiceRow.status == status)
    ids = list(connection.execute(query).scalars())
    found = {invoice.id: invoice for invoice in invoices_by_ids(connection, ids)}
    return [found[i] for i in ids]


def invoices_by_ids(connection: Connection, invoice_ids: Sequence[uuid.UUID]) -> list[Invoice]:
    return _invoices(connection, InvoiceRow.id.in_(invoice_ids)) if invoice_ids else []


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
        {
            "ids": array_literal(p[0] for p in periods),
            "starts": array_literal(p[1] for p in periods),
        },
    )
    return {(row.subscription_id, row.period_start) for row in rows}


# Invoices are staged with COPY (one round trip, no per-row parameters), then inserted, or a draft
# updated, by one statement. A final invoice is never changed: the update is conditional on the
# stored row being a draft, and its lines travel with it in the same row.
_STAGE = (
    "CREATE TEMPORARY TABLE billing_invoices_staged (id uuid, organization_id uuid,"
    " subscription_id uuid, period_start timestamptz, period_end timestamptz, currency text,"
    " status text, flat_amount bigint, total bigint, finalized_at timestamptz,"
    " plan_snapshot jsonb, lines json) ON COMMIT DROP"
)
_COPY = "COPY billing_invoices_staged FROM STDIN"
_COPY_NEW = (
    "COPY invoices (id, organization_id, subscription_id, period_start, period_end, currency,"
    " status, flat_amount, total, finalized_at, plan_snapshot, lines) FROM STDIN"
)
_SAVE = (
    "INSERT INTO invoices AS i (id, organization_id, subscription_id, period_start, period_end,"
    " currency, status, flat_amount, total, finalized_at, plan_snapshot, lines)"
    " SELECT * FROM billing_invoices_staged"
    " ON CONFLICT (subscription_id, period_start) DO UPDATE SET status = excluded.status,"
    " period_end = excluded.period_end, flat_amount = excluded.flat_amount,"
    " total = excluded.total, finalized_at = excluded.finalized_at,"
    " plan_snapshot = excluded.plan_snapshot, lines = excluded.lines, updated_at = now()"
    " WHERE i.status = 'draft'"
)


def _copy_json(document: object) -> str:
    # COPY's text format takes backslashes as escapes: double them. msgspec escapes every
    # control character inside strings, so no tab or newline reaches the stream raw.
    return msgspec.json.encode(document).decode().replace("\\", "\\\\")


_NULL = "\\N"  # COPY's text format for NULL


def _copy_time(moment: datetime | None) -> str:
    return iso(moment) if moment is not None else _NULL


@dataclass(frozen=True)
class InvoiceRows:
    """Invoices in COPY's text format, ready to write: `new` (no stored row: copied straight in)
    and `updated` (through the staged upsert). Built apart from the write, so a writer thread
    only waits on the database."""

    new: str
    updated: str


def invoice_rows(invoices: Sequence[Invoice], *, new: frozenset[uuid.UUID]) -> InvoiceRows:
    """`new` names the invoices the caller found no stored row for."""
    fresh: list[str] = []
    updated: list[str] = []
    # Subscriptions alike share their periods' pricing objects (services.billing.invoices caches
    # them): each one's snapshot text and segment positions are built once per call, by identity
    # (every pricing stays referenced by its invoice until the call returns).
    snapshots: dict[int, tuple[str, dict[datetime, int]]] = {}
    for invoice in invoices:
        pricing = invoice.pricing
        found = snapshots.get(id(pricing))
        if found is None:
            positions = {s.start: n for n, s in enumerate(pricing.segments)} if pricing else {}
            found = (_copy_json(pricing.to_json()) if pricing else _NULL, positions)
            snapshots[id(pricing)] = found
        snapshot, segments = found
        # Ids, instants, currency codes and statuses hold nothing COPY would read as an escape.
        (fresh if invoice.id in new else updated).append(
            f"{invoice.id}\t{invoice.organization_id}\t{invoice.subscription_id}\t"
            f"{iso(invoice.period_start)}\t{iso(invoice.period_end)}\t"
            f"{invoice.currency}\t{invoice.status}\t{invoice.flat_amount}\t{invoice.total}\t"
            f"{_copy_time(invoice.finalized_at)}\t{snapshot}\t"
            f"{_copy_json([_line_document(line, segments) for line in invoice.lines])}\n"
        )
    return InvoiceRows("".join(fresh), "".join(updated))


def save_invoices(connection: Connection, rows: InvoiceRows) -> None:
    """Insert new invoices and update drafts (by subscription and period), lines included.

    New ones (the caller found no stored row, and under the billing lock no one else writes
    invoices) are copied straight into the table; the others go through the staged upsert, which
    never touches a final invoice."""
    if not rows.new and not rows.updated:
        return
    raw = connection.connection.driver_connection
    assert raw is not None
    with raw.cursor() as cursor:
        if rows.new:
            with cursor.copy(_COPY_NEW) as copy:
                copy.write(rows.new)
        if rows.updated:
            cursor.execute(_STAGE)
            with cursor.copy(_COPY) as copy:
                copy.write(rows.updated)
            cursor.execute(_SAVE)
            cursor.execute("DROP TABLE billing_invoices_staged")


@dataclass(frozen=True)
class InvoiceToCollect:
    invoice: Invoice
    customer_id: str
    stripe_invoice_id: str | None


def invoices_to_collect(
    connection: Connection, subscription_ids: Sequence[uuid.UUID] | None, *, since: datetime
) -> list[InvoiceToCollect]:
    """Final invoices ended after `since` that Stripe does not collect yet (no Stripe invoice,
    or one still a draft), of organizations that have a Stripe customer. Older ones are not
    sent: a release that starts collecting does not charge for periods long closed."""
    where = sa.and_(
        InvoiceRow.status == "final",
        InvoiceRow.period_end > since,
        sa.or_(InvoiceRow.stripe_invoice_id.is_(None), InvoiceRow.stripe_status == "draft"),
        InvoiceRow.organization_id.in_(
            sa.select(Organization.id).where(Organization.stripe_customer_id.is_not(None))
        ),
    )
    if subscription_ids is not None:
        where = sa.and_(where, InvoiceRow.subscription_id.in_(subscription_ids))
    invoices = _invoices(connection, where)
    customers = dict(
        connection.execute(
            sa.select(Organization.id, Organization.stripe_customer_id).where(
                Organization.id.in_({i.organization_id for i in invoices})
            )
        ).all()
    )
    return [
        InvoiceToCollect(i, str(customers[i.organization_id]), i.stripe_invoice_id)
        for i in invoices
    ]


def set_stripe_invoice(
    connection: Connection,
    invoice_id: uuid.UUID,
    *,
    stripe_invoice_id: str,
    status: str | None,
    total: int | None,
    at: datetime,
) -> None:
    connection.execute(
        sa.update(InvoiceRow)
        .where(InvoiceRow.id == invoice_id)
        .values(
            stripe_invoice_id=stripe_invoice_id,
            stripe_status=status,
            stripe_total=total,
            stripe_synced_at=at,
        )
    )


@dataclass(frozen=True)
class CollectedInvoice:
    id: uuid.UUID
    subscription_id: uuid.UUID
    period_start: datetime
    total: int
    stripe_invoice_id: str


def collected_invoices(
    connection: Connection, subscription_ids: Sequence[uuid.UUID], *, since: datetime
) -> list[CollectedInvoice]:
    """Final invoices that Stripe collects, ended after `since` (what reconciliation checks)."""
    if not subscription_ids:
        return []
    rows = connection.execute(
        sa.select(
            InvoiceRow.id,
            InvoiceRow.subscription_id,
            InvoiceRow.period_start,
            InvoiceRow.total,
            InvoiceRow.stripe_invoice_id,
        )
        .where(InvoiceRow.subscription_id.in_(subscription_ids))
        .where(InvoiceRow.stripe_invoice_id.is_not(None))
        .where(InvoiceRow.period_end > since)
        .order_by(InvoiceRow.subscription_id, InvoiceRow.period_start)
    )
    return [CollectedInvoice(r[0], r[1], r[2], int(r[3]), str(r[4])) for r in rows]


def invoice_periods(
    connection: Connection, subscription_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, dict[datetime, datetime]]:
    """Each subscription's invoiced periods: start -> end."""
    found: dict[uuid.UUID, dict[datetime, datetime]] = defaultdict(dict)
    if subscription_ids:
        rows = connection.execute(
            sa.select(
                InvoiceRow.subscription_id, InvoiceRow.period_start, InvoiceRow.period_end
            ).where(InvoiceRow.subscription_id.in_(subscription_ids))
        )
        for subscription_id, start, end in rows:
            found[subscription_id][start] = end
    return dict(found)
