"""Pipeline health: ingest and aggregator /healthz, consumer lag per partition, events/s, the
last batch and dead-letter counts, with charts of throughput and lag from the sampler."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from services.console.charts import Series, line_chart
from services.console.pipeline import (
    PipelineHealth,
    ServiceHealth,
    pipeline_health,
    recent_samples,
    throughput,
)
from services.console.routing import Call, Operation, Page, Param, Render
from services.console.schemas import Document, obj

HOURS = Param(
    "hours", "How many hours of samples to chart.", "integer", minimum=1, maximum=168, default=6
)


def _service(health: ServiceHealth) -> Document:
    return {"url": health.url, "status": health.status, "detail": health.detail}


def health_document(health: PipelineHealth, points: list) -> Document:
    rates = [p.events_per_second for p in points if p.events_per_second is not None]
    return {
        "checked_at": health.checked_at,
        "ingest": [_service(s) for s in health.ingest],
        "aggregators": [
            _service(a)
            | {"events_total": a.events_total, "dead_letters_by_code": a.dead_letters_by_code}
            for a in health.aggregators
        ],
        "consumer_group": health.consumer_group,
        "partitions": [
            {"partition": p.partition, "committed": p.committed, "end": p.end, "lag": p.lag}
            for p in health.partitions
        ],
        "lag": health.lag,
        "lag_error": health.lag_error,
        "last_batch_at": health.last_batch_at,
        "events_per_second": round(rates[-1], 1) if rates else None,
        "kafka_as_of": health.kafka_as_of,
        "dead_letters": {
            "retained": health.dlq_retained,
            "pending": health.dlq_pending,
            "error": health.dead_letter_error,
        },
        "samples": [
            {
                "at": p.at,
                "events_per_second": None
                if p.events_per_second is None
                else round(p.events_per_second, 3),
                "lag": p.lag,
                "dlq_messages": p.dlq_messages,
            }
            for p in points
        ],
    }


def pipeline(call: Call) -> Document:
    fresh = timedelta(seconds=call.settings.console_sample_seconds * 3)
    health = pipeline_health(call.settings, call.session, call.live, now=call.now, max_age=fresh)
    since = call.now - timedelta(hours=call.arg("hours"))
    return health_document(health, throughput(recent_samples(call.session, since=since)))


operations = [
    Operation(
        "GET",
        "/pipeline",
        "pipelineHealth",
        "Pipeline health: services, lag per partition, events/s, last batch, dead letters",
        "pipeline",
        pipeline,
        obj(
            {
                "checked_at": {"type": "string", "format": "date-time"},
                "ingest": {"type": "array", "items": {"type": "object"}},
                "aggregators": {"type": "array", "items": {"type": "object"}},
                "consumer_group": {"type": "string"},
                "partitions": {"type": "array", "items": {"type": "object"}},
                "lag": {"type": ["integer", "null"]},
                "lag_error": {"type": ["string", "null"]},
                "last_batch_at": {"type": ["string", "null"]},
                "kafka_as_of": {"type": "string", "format": "date-time"},
                "events_per_second": {"type": ["number", "null"]},
                "dead_letters": {"type": "object"},
                "samples": {"type": "array", "items": {"type": "object"}},
            }
        ),
        params=(HOURS,),
        description="Services are probed now; offsets and dead-letter counts come from the "
        "console's latest sample (METERLINE_CONSOLE_SAMPLE_SECONDS; `kafka_as_of`) when it is "
        "at most three intervals old, else are read now. Events/s is the change of the "
        "aggregators' event counter between samples.",
    ),
]


def _page(call: Call) -> Render:
    document = pipeline(call)
    rate: list[tuple[datetime, Decimal]] = [
        (s["at"], Decimal(str(s["events_per_second"])))
        for s in document["samples"]
        if s["events_per_second"] is not None
    ]
    lag: list[tuple[datetime, int]] = [
        (s["at"], s["lag"]) for s in document["samples"] if s["lag"] is not None
    ]
    return Render(
        "pipeline.html",
        {
            "pipeline": document,
            "throughput_chart": line_chart(
                [Series("events/s", rate)], title="Events counted per second"
            ),
            "lag_chart": line_chart([Series("lag", lag)], title="Consumer lag (messages)"),
            "hours": call.arg("hours"),
        },
    )


pages = [Page("GET", "/pipeline", _page, params=(HOURS,))]
