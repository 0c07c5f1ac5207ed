"""Replay runs: what each `meterline replay` did (range, filters, per-metric changes)."""

from __future__ import annotations

from services.aggregator.replay_runs import list_replay_runs
from services.console.routing import PAGING, Call, Operation, Page, Param, Render
from services.console.schemas import Document, page_of, paged, replay_run_document

PAGE = Param("page", "Page number.", "integer", minimum=1, maximum=10**6, default=1)


def replay_runs(call: Call) -> Document:
    limit, offset = call.arg("limit"), call.arg("offset")
    found = list_replay_runs(call.session, limit=limit, offset=offset)
    return paged([replay_run_document(r) for r in found.runs], found.total, limit, offset)


operations = [
    Operation(
        "GET",
        "/replay-runs",
        "listReplayRuns",
        "Replay runs, newest first",
        "replay",
        replay_runs,
        page_of("ReplayRun"),
        params=PAGING,
    ),
]


def _page(call: Call) -> Render:
    limit = 50
    found = list_replay_runs(call.session, limit=limit, offset=(call.arg("page") - 1) * limit)
    return Render(
        "replay_runs.html",
        {
            "runs": [replay_run_document(r) for r in found.runs],
            "total": found.total,
            "page": call.arg("page"),
            "pages": max(1, -(-found.total // limit)),
        },
    )


pages = [Page("GET", "/replay-runs", _page, params=(PAGE,))]
