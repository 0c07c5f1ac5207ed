"""Dead letters: the latest letters of the DLQ topic with their reasons, re-publishing one, and
re-publishing every retryable one (what `meterline replay dlq` does)."""

from __future__ import annotations

from services.aggregator.dead_letters import (
    parse_reference,
    republish_dead_letter,
)
from services.aggregator.dlq_replay import DlqReplayReport, replay_dead_letters
from services.console.routing import Call, Operation, Page, Param, Redirect, Render
from services.console.schemas import (
    Document,
    dead_letter_document,
    dlq_partition_document,
    obj,
)
from shared.audit import record_change

LIMIT = Param(
    "limit", "How many of the newest letters.", "integer", minimum=1, maximum=1000, default=100
)
LETTER = Param("letter", "<partition>:<offset> in the DLQ topic.", location="path", required=True)


def dead_letters(call: Call) -> Document:
    listing = call.live.dead_letters.listing(limit=call.arg("limit"))
    return {
        "topic": call.settings.dlq_topic,
        "retained": listing.retained,
        "pending": listing.pending,
        "by_code": listing.by_code,
        "partitions": [dlq_partition_document(p) for p in listing.partitions],
        "items": [dead_letter_document(v) for v in listing.letters],
    }


def republish_one(call: Call) -> Document:
    partition, offset = parse_reference(call.path["letter"])
    sent = republish_dead_letter(call.settings, partition, offset)
    record_change(
        call.session,
        call.principal.actor,
        "dead_letter.republish",
        target_type="dead_letter",
        target_id=sent.letter.reference,
        details={
            "code": sent.letter.code,
            "organization_id": str(sent.letter.organization_id or ""),
            "events": sent.letter.event_count,
            "to": f"{sent.topic}[{sent.partition}]@{sent.offset}",
        },
    )
    return {
        "letter": dead_letter_document(sent.letter),
        "topic": sent.topic,
        "partition": sent.partition,
        "offset": sent.offset,
    }


def republish_retryable(call: Call) -> DlqReplayReport:
    report = replay_dead_letters(call.settings)
    record_change(
        call.session,
        call.principal.actor,
        "dead_letters.republish_retryable",
        target_type="dead_letter",
        target_id=None,
        details={
            "read": report.read,
            "republished": report.republished,
            "skipped": dict(report.skipped),
        },
    )
    return report


_REPORT = obj(
    {
        "read": {"type": "integer"},
        "republished": {"type": "integer"},
        "skipped": {"type": "object", "additionalProperties": {"type": "integer"}},
    }
)

operations = [
    Operation(
        "GET",
        "/dead-letters",
        "listDeadLetters",
        "The newest dead letters with their reasons, and how many there are",
        "dead letters",
        dead_letters,
        obj(
            {
                "topic": {"type": "string"},
                "retained": {"type": "integer"},
                "pending": {"type": "integer", "description": "not yet seen by `replay dlq`"},
                "by_code": {"type": "object", "additionalProperties": {"type": "integer"}},
                "partitions": {"type": "array", "items": {"type": "object"}},
                "items": {"type": "array", "items": {"$ref": "#/components/schemas/DeadLetter"}},
            }
        ),
        params=(LIMIT,),
    ),
    Operation(
        "POST",
        "/dead-letters/{letter}/republish",
        "republishDeadLetter",
        "Re-publish one retryable dead letter to the events topic",
        "dead letters",
        republish_one,
        obj(
            {
                "letter": {"$ref": "#/components/schemas/DeadLetter"},
                "topic": {"type": "string"},
                "partition": {"type": "integer"},
                "offset": {"type": "integer"},
            }
        ),
        params=(LETTER,),
        change=True,
        description="404 when the DLQ no longer holds it; 409 when its reason is not "
        "retryable. Safe to repeat: the ledger counts an event id once.",
    ),
    Operation(
        "POST",
        "/dead-letters/republish-retryable",
        "republishRetryableDeadLetters",
        "Re-publish every retryable dead letter not handled yet (`meterline replay dlq`)",
        "dead letters",
        lambda call: {
            "read": (r := republish_retryable(call)).read,
            "republished": r.republished,
            "skipped": dict(r.skipped),
        },
        _REPORT,
        change=True,
    ),
]


def _page(call: Call) -> Render:
    return Render("dead_letters.html", dead_letters(call))


def _republish_page(call: Call) -> Redirect:
    sent = republish_one(call)
    return Redirect(
        "/dead-letters",
        f"Re-published {sent['letter']['reference']} ({sent['letter']['code']}) to "
        f"{sent['topic']}.",
    )


def _republish_all_page(call: Call) -> Redirect:
    report = republish_retryable(call)
    left = ", ".join(f"{code}: {n}" for code, n in sorted(report.skipped.items())) or "none"
    return Redirect(
        "/dead-letters",
        f"Read {report.read} new dead letters, re-published {report.republished}; left: {left}.",
    )


pages = [
    Page("GET", "/dead-letters", _page, params=(LIMIT,)),
    Page("POST", "/dead-letters/republish-retryable", _republish_all_page),
    Page("POST", "/dead-letters/{letter}/republish", _republish_page),
]
