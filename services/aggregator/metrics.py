"""Prometheus metrics of the aggregator; labels stay low-cardinality (never an organization id)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("meterline_aggregator_events_total", "Events counted into usage_records")
DUPLICATES = Counter(
    "meterline_aggregator_duplicates_total", "Repeated events (same id, same content) not counted"
)
CONFLICTS = Counter(
    "meterline_aggregator_conflicts_total",
    "Repeated event ids with different content, not counted and sent to the DLQ",
)
DLQ = Counter("meterline_aggregator_dlq_total", "Dead letters sent, by reason code", ["code"])
BATCH_SECONDS = Histogram(
    "meterline_aggregator_batch_seconds",
    "Time to apply one batch (decode, database transaction, DLQ acks)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CONSUMER_LAG = Gauge(
    "meterline_aggregator_consumer_lag",
    "Messages between the last applied offset and the partition's high watermark",
    ["partition"],
)
RETRIES = Counter(
    "meterline_aggregator_retries_total",
    "Batch attempts retried because a dependency (database, broker) failed",
    ["dependency"],
)
