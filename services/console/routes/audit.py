"""The audit log: every change made through the console, the API or an operator command."""

from __future__ import annotations

from services.console.routing import PAGING, Call, Operation, Page, Param, Render
from services.console.schemas import Document, audit_document, page_of, paged
from shared.audit import list_audit

ACTION = Param("action", "Only this action, e.g. api_key.revoke.")
PAGE = Param("page", "Page number.", "integer", minimum=1, maximum=10**6, default=1)


def audit(call: Call) -> Document:
    limit, offset = call.arg("limit"), call.arg("offset")
    found = list_audit(call.session, limit=limit, offset=offset, action=call.arg("action") or None)
    return paged([audit_document(e) for e in found.entries], found.total, limit, offset)


operations = [
    Operation(
        "GET",
        "/audit",
        "listAudit",
        "The audit log, newest first",
        "audit",
        audit,
        page_of("AuditEntry"),
        params=(ACTION, *PAGING),
    ),
]


def _page(call: Call) -> Render:
    limit = 50
    found = list_audit(
        call.session,
        limit=limit,
        offset=(call.arg("page") - 1) * limit,
        action=call.arg("action") or None,
    )
    return Render(
        "audit.html",
        {
            "entries": [audit_document(e) for e in found.entries],
            "total": found.total,
            "action": call.arg("action") or "",
            "page": call.arg("page"),
            "pages": max(1, -(-found.total // limit)),
        },
    )


pages = [Page("GET", "/audit", _page, params=(ACTION, PAGE))]
