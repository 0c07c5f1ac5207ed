"""The Python client, kept importable here for code written against `meterline.client`.

It lives in its own distribution, `meterline-client` (clients/python/), which depends on httpx
only; new code imports `meterline_client` directly.
"""

from meterline_client import (
    AsyncMeterlineClient,
    BufferFull,
    ClientClosed,
    ClientOptions,
    EventsRejected,
    MeterlineClient,
    MeterlineClientError,
    RejectedEvent,
    RetryPolicy,
    UsageReport,
    UsageRow,
    make_event,
)

__all__ = [
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
]
