"""Invoices: list them, show one with its lines, and the page its customer reads (the renderer
`meterline invoices show --html` writes with)."""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from collections.abc import Mapping

from services.billing import invoice_repository
from services.billing.documents import customer_party, invoice_summary, seller_party
from services.billing.invoice_html import render_invoice_html
from services.billing.invoices import Invoice
from services.console.routing import Call, Operation, Page, Param, Render
from services.console.schemas import Document, obj
from shared.access import organizations_by_id, require_organization
from shared.errors import InvalidInput, NotFound
from shared.models import Organization
from shared.organizations import find_organization

ORGANIZATION = Param("organization", "Only this organization (id or slug).")
SUBSCRIPTION = Param("subscription", "Only this subscription (id).")
STATUS = Param("status", "draft or final.", enum=("draft", "final"))
LIMIT = Param("limit", "At most this many, newest period first.", "integer", minimum=1,
              maximum=200, default=50)  # fmt: skip
INVOICE = Param("invoice", "Invoice id.", location="path", required=True)

_MINOR = {"type": "integer", "description": "minor units"}
_TIME = {"type": "string", "format": "date-time"}
INVOICE_SUMMARY = obj(
    {
        "id": {"type": "string", "format": "uuid"},
        "organization_id": {"type": "string", "format": "uuid"},
        "organization": {"type": "string", "description": "the organization's slug"},
        "subscription_id": {"type": "string", "format": "uuid"},
        "period_start": _TIME,
        "period_end": _TIME,
        "currency": {"type": "string"},
        "status": {"type": "string", "enum": ["draft", "final"]},
        "flat_amount": _MINOR,
        "flat_lines": {
            "type": "array",
            "items": obj({"description": {"type": "string"}, "amount": _MINOR}),
        },
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "description": "metric, quantity and billable_quantity (decimal strings), "
                "amount, kind (usage or adjustment), segment_start or adjusts_period_start",
            },
        },
        "total": _MINOR,
        "stripe_invoice_id": {"type": ["string", "null"]},
        "stripe_status": {"type": ["string", "null"]},
        "stripe_total": {"type": ["integer", "null"]},
    }
)
RENDERED = obj(
    {
        "id": {"type": "string", "format": "uuid"},
        "html": {"type": "string", "description": "the whole page, as `invoices show --html`"},
    }
)
_STYLE = re.compile(r"<style>(.*?)</style>", re.DOTALL)
NONE = "'none'"


def _document(invoice: Invoice, organizations: Mapping[uuid.UUID, Organization]) -> Document:
    return invoice_summary(invoice) | {"organization": organizations[invoice.organization_id].slug}


def _documents(call: Call, invoices: list[Invoice]) -> list[Document]:
    organizations = organizations_by_id(call.session, (i.organization_id for i in invoices))
    return [_document(invoice, organizations) for invoice in invoices]


def invoice_documents(
    call: Call,
    *,
    organization_id: uuid.UUID | None = None,
    subscription_id: uuid.UUID | None = None,
    status: str | None = None,
    limit: int = 50,
) -> list[Document]:
    found = invoice_repository.list_invoices(
        call.session.connection(),
        organization_id=organization_id,
        subscription_id=subscription_id,
        status=status,
        limit=limit,
    )
    return _documents(call, found)


def _find(call: Call) -> Invoice:
    reference = call.path["invoice"]
    try:
        invoice_id = uuid.UUID(reference)
    except ValueError:
        raise NotFound(f"invoice {reference!r} not found") from None
    invoice = invoice_repository.invoice_by_id(call.session.connection(), invoice_id)
    if invoice is None:
        raise NotFound(f"invoice {reference} not found")
    return invoice


def _subscription_filter(call: Call) -> uuid.UUID | None:
    reference = call.arg("subscription")
    if not reference:
        return None
    try:
        return uuid.UUID(reference)
    except ValueError:
        raise InvalidInput(f"subscription: {reference!r} is not a subscription id") from None


def invoices(call: Call) -> Document:
    organization = call.arg("organization")
    return {
        "items": invoice_documents(
            call,
            organization_id=find_organization(call.session, organization).id
            if organization
            else None,
            subscription_id=_subscription_filter(call),
            status=call.arg("status"),
            limit=call.arg("limit"),
        ),
        "limit": call.arg("limit"),
    }


def invoice(call: Call) -> Document:
    [document] = _documents(call, [_find(call)])
    return document


def customer_html(call: Call, invoice: Invoice) -> str:
    """The page the customer reads: the command line's renderer, with the same parties."""
    organization = require_organization(call.session, invoice.organization_id)
    return render_invoice_html(invoice, seller_party(call.settings), customer_party(organization))


operations = [
    Operation(
        "GET",
        "/invoices",
        "listInvoices",
        "Invoices, newest period first",
        "invoices",
        invoices,
        obj({"items": {"type": "array", "items": INVOICE_SUMMARY}, "limit": {"type": "integer"}}),
        params=(ORGANIZATION, SUBSCRIPTION, STATUS, LIMIT),
    ),
    Operation(
        "GET",
        "/invoices/{invoice}",
        "getInvoice",
        "An invoice with its flat fees, usage lines and adjustments",
        "invoices",
        invoice,
        INVOICE_SUMMARY,
        params=(INVOICE,),
    ),
    Operation(
        "GET",
        "/invoices/{invoice}/html",
        "renderInvoice",
        "The invoice as its customer reads it (one self-contained HTML page)",
        "invoices",
        lambda call: {"id": call.path["invoice"], "html": customer_html(call, _find(call))},
        RENDERED,
        params=(INVOICE,),
        description="The page `meterline invoices show --html FILE` writes; the console serves "
        "it at /invoices/{invoice}/document.",
    ),
]


def _list_page(call: Call) -> Render:
    return Render(
        "invoices.html",
        {
            **invoices(call),
            "organization": call.arg("organization") or "",
            "subscription": call.arg("subscription") or "",
            "status": call.arg("status") or "",
        },
    )


def _detail_page(call: Call) -> Render:
    return Render("invoice.html", {"invoice": invoice(call)})


def _customer_page(call: Call) -> Render:
    page = customer_html(call, _find(call))
    # The page carries its own small stylesheet inline: allow exactly that one, nothing else.
    styles = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(css.encode()).digest()).decode() + "'"
        for css in _STYLE.findall(page)
    )
    policy = (
        f"default-src 'none'; style-src {styles or NONE}; img-src 'none'; form-action 'none'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    return Render("customer_invoice.html", {"page": page},
                  headers={"Content-Security-Policy": policy})  # fmt: skip


pages = [
    Page("GET", "/invoices", _list_page, params=(ORGANIZATION, SUBSCRIPTION, STATUS, LIMIT)),
    Page("GET", "/invoices/{invoice}", _detail_page),
    Page("GET", "/invoices/{invoice}/document", _customer_page),
]
