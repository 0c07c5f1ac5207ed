"""Prometheus metrics of ingest; with several workers they are shared through
PROMETHEUS_MULTIPROC_DIR, which `meterline ingest serve` sets before the workers start."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter(
    "meterline_ingest_requests", "Requests to POST /v1/events by status code", ["status"]
)
EVENTS_ACCEPTED = Counter(
    "meterline_ingest_events_accepted", "Events acknowledged by the broker and answered 202"
)
EVENTS_REJECTED = Counter(
    "meterline_ingest_events_rejected", "Events of requests refused with 403 or 422"
)
PUBLISH_SECONDS = Histogram(
    "meterline_ingest_publish_seconds",
    "Time from handing a request's envelope to the producer until the broker acknowledged it",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def render() -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)
