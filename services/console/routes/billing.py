"""Billing: its runs, and the reconciliation mismatches people resolve with a note."""

from __future__ import annotations

import uuid

from services.billing.history import list_billing_runs
from services.billing.mismatches import (
    MismatchView,
    get_mismatch,
    list_mismatches,
    parse_state,
    resolve_mismatch,
)
from services.console.routing import PAGING, Call, Operation, Page, Param, Redirect, Render
from services.console.schemas import (
    Document,
    billing_run_document,
    mismatch_document,
    obj,
    page_of,
    paged,
)
from shared.audit import record_change
from shared.errors import NotFound

STATE = Param(
    "state", "open (default), resolved or all.", enum=("open", "resolved", "all"), default="open"
)
MISMATCH = Param("mismatch", "Mismatch id.", location="path", required=True)
PAGE = Param("page", "Page number.", "integer", minimum=1, maximum=10**6, default=1)


def billing_runs(call: Call) -> Document:
    limit, offset = call.arg("limit"), call.arg("offset")
    found = list_billing_runs(call.session, limit=limit, offset=offset)
    return paged([billing_run_document(r) for r in found.runs], found.total, limit, offset)


def mismatches(call: Call) -> Document:
    limit, offset = call.arg("limit"), call.arg("offset")
    found = list_mismatches(
        call.session, state=parse_state(call.arg("state")), limit=limit, offset=offset
    )
    return paged([mismatch_document(m) for m in found.mismatches], found.total, limit, offset)


def _mismatch_id(call: Call) -> uuid.UUID:
    try:
        return uuid.UUID(call.path["mismatch"])
    except ValueError:
        raise NotFound(f"mismatch {call.path['mismatch']!r} not found") from None


def resolve(call: Call, note: object) -> MismatchView:
    from shared.errors import InvalidInput

    if not isinstance(note, str):
        raise InvalidInput("note: is required, a string", details=["note: is required"])
    resolved = resolve_mismatch(
        call.session,
        _mismatch_id(call),
        note=note,
        resolved_by=call.principal.operator.name,
        now=call.now,
    )
    record_change(
        call.session,
        call.principal.actor,
        "mismatch.resolve",
        target_type="reconciliation_mismatch",
        target_id=resolved.id,
        details={
            "kind": resolved.kind,
            "organization": resolved.organization_slug,
            "note": resolved.resolution_note,
        },
    )
    return resolved


operations = [
    Operation(
        "GET",
        "/billing-runs",
        "listBillingRuns",
        "Billing runs, newest first",
        "billing",
        billing_runs,
        page_of("BillingRun"),
        params=PAGING,
    ),
    Operation(
        "GET",
        "/mismatches",
        "listMismatches",
        "Reconciliation mismatches, newest first",
        "billing",
        mismatches,
        page_of("Mismatch"),
        params=(STATE, *PAGING),
    ),
    Operation(
        "GET",
        "/mismatches/{mismatch}",
        "getMismatch",
        "One reconciliation mismatch",
        "billing",
        lambda call: mismatch_document(get_mismatch(call.session, _mismatch_id(call))),
        {"$ref": "#/components/schemas/Mismatch"},
        params=(MISMATCH,),
    ),
    Operation(
        "POST",
        "/mismatches/{mismatch}/resolve",
        "resolveMismatch",
        "Mark a mismatch resolved, with a note",
        "billing",
        lambda call: mismatch_document(resolve(call, (call.body or {}).get("note"))),
        {"$ref": "#/components/schemas/Mismatch"},
        params=(MISMATCH,),
        body=obj({"note": {"type": "string", "minLength": 1, "maxLength": 2000}}),
        change=True,
        description="409 when it is resolved already (by a run's fix or a person).",
    ),
]


def _runs_page(call: Call) -> Render:
    limit = 50
    found = list_billing_runs(call.session, limit=limit, offset=(call.arg("page") - 1) * limit)
    return Render(
        "billing_runs.html",
        {
            "runs": [billing_run_document(r) for r in found.runs],
            "total": found.total,
            "page": call.arg("page"),
            "pages": max(1, -(-found.total // limit)),
        },
    )


def _mismatches_page(call: Call) -> Render:
    limit = 50
    state = parse_state(call.arg("state"))
    found = list_mismatches(
        call.session, state=state, limit=limit, offset=(call.arg("page") - 1) * limit
    )
    return Render(
        "mismatches.html",
        {
            "mismatches": [mismatch_document(m) for m in found.mismatches],
            "total": found.total,
            "state": state,
            "page": call.arg("page"),
            "pages": max(1, -(-found.total // limit)),
        },
    )


def _resolve_page(call: Call) -> Redirect:
    resolved = resolve(call, call.form.get("note", ""))
    return Redirect("/mismatches", f"Resolved {resolved.kind} of {resolved.organization_slug}.")


pages = [
    Page("GET", "/billing-runs", _runs_page, params=(PAGE,)),
    Page("GET", "/mismatches", _mismatches_page, params=(STATE, PAGE)),
    Page("POST", "/mismatches/{mismatch}/resolve", _resolve_page),
]
