"""services.billing.invoice_repository.save_invoices against real PostgreSQL: a final invoice is
never changed by SQL, whatever a caller asks, and its lines travel with it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.billing import invoice_repository
from services.billing.invoices import Invoice, InvoiceLine, InvoiceStatus
from shared.models import Invoice as InvoiceRow
from tests import factories

NOV = datetime(2026, 11, 1, tzinfo=UTC)
DEC = datetime(2026, 12, 1, tzinfo=UTC)


def invoice(subscription: Any, status: InvoiceStatus, total: int) -> Invoice:
    return Invoice(
        id=uuid.uuid4(),
        organization_id=subscription.organization_id,
        subscription_id=subscription.id,
        period_start=NOV,
        period_end=DEC,
        currency="usd",
        status=status,
        flat_amount=100,
        total=total,
        finalized_at=DEC if status == "final" else None,
        pricing=None,
        lines=(
            InvoiceLine(
                "usage", "exports", Decimal(total - 100), Decimal(total - 100), total - 100
            ),
        ),
    )


def rows(invoices: list[Invoice], *, new: bool = False) -> invoice_repository.InvoiceRows:
    ids = frozenset(invoice.id for invoice in invoices) if new else frozenset()
    return invoice_repository.invoice_rows(invoices, new=ids)


def stored(db: Session, subscription_id: uuid.UUID) -> list[Any]:
    rows = db.execute(
        sa.select(InvoiceRow.id, InvoiceRow.status, InvoiceRow.total, InvoiceRow.lines).where(
            InvoiceRow.subscription_id == subscription_id
        )
    ).all()
    return [
        (i, status, total, [line["amount"] for line in lines]) for i, status, total, lines in rows
    ]


def test_saving_over_a_final_invoice_changes_nothing(db: Session) -> None:
    organization = factories.make_organization(db)
    subscription = factories.make_subscription(db, organization, factories.make_plan(db))
    final = invoice(subscription, "final", 150)
    invoice_repository.save_invoices(db.connection(), rows([final], new=True))

    invoice_repository.save_invoices(db.connection(), rows([invoice(subscription, "final", 999)]))

    assert stored(db, subscription.id) == [(final.id, "final", 150, [50])]


def test_saving_over_a_draft_keeps_its_id_and_replaces_its_lines(db: Session) -> None:
    organization = factories.make_organization(db)
    subscription = factories.make_subscription(db, organization, factories.make_plan(db))
    draft = invoice(subscription, "draft", 150)
    invoice_repository.save_invoices(db.connection(), rows([draft], new=True))

    invoice_repository.save_invoices(db.connection(), rows([invoice(subscription, "final", 180)]))

    assert stored(db, subscription.id) == [(draft.id, "final", 180, [80])]
