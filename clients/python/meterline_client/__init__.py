"""The Python client of Meterline's ingest API (depends on httpx only).

    from meterline_client import MeterlineClient

    with MeterlineClient("http://127.0.0.1:8080", api_key) as client:
        client.record("api_calls")

Events get their id when they are recorded, so every retry re-sends the same ids and the pipeline
counts each once. See MeterlineClient, AsyncMeterlineClient and ClientOptions.
"""

from meterline_client.aio import AsyncMeterlineClient
from meterline_client.client import MeterlineClient
from meterline_client.delivery import MAX_BATCH_BYTES, MAX_BATCH_EVENTS, RetryPolicy
from meterline_client.errors import (
    BufferFull,
    ClientClosed,
    EventsRejected,
    MeterlineClientError,
    RejectedEvent,
)
from meterline_client.events import make_event, uuid7
from meterline_client.options import ClientOptions
from meterline_client.usage import UsageReport, UsageRow

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCH_EVENTS",
    "AsyncMeterlineClient",
    "BufferFull",
    "ClientClosed",
    "ClientOptions",
    "EventsRejected",
    "MeterlineClient",
    "MeterlineClientError",
    "RejectedEvent",
    "RetryPolicy",
    "UsageReport",
    "UsageRow",
    "make_event",
    "uuid7",
]
