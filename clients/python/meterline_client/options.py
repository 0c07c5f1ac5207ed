"""The settings both clients share, checked once when a client is made."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from meterline_client.delivery import MAX_BATCH_EVENTS, RetryPolicy
from meterline_client.errors import RejectedEvent

OnRejected = Callable[[list[RejectedEvent]], None]


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """How a client buffers and sends.

    batch_size      events per request (1-1000); a full batch is sent at once
    flush_interval  seconds between background flushes (None: no background flush; record()
                    then sends a full batch itself)
    max_buffer      events held at most (recorded and not yet accepted); when it is reached,
                    record() waits for room up to block_timeout seconds (None: as long as it
                    takes), then raises BufferFull without recording the event
    on_rejected     called with the events the service refused (422, or 403 for a project the
                    key may not write); without it the next flush()/close() raises
                    EventsRejected once for them. The rest of their batch is sent either way.
    exit_timeout    how long the flush at interpreter exit may take
    """

    batch_size: int = MAX_BATCH_EVENTS
    flush_interval: float | None = 1.0
    max_buffer: int = 100_000
    block_timeout: float | None = 30.0
    timeout: float = 10.0
    exit_timeout: float = 5.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    on_rejected: OnRejected | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= MAX_BATCH_EVENTS:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH_EVENTS}")
        if self.flush_interval is not None and not self.flush_interval > 0:
            raise ValueError("flush_interval must be positive (or None for no background flush)")
        if self.max_buffer < self.batch_size:
            raise ValueError("max_buffer must hold at least one batch")
        if self.block_timeout is not None and self.block_timeout < 0:
            raise ValueError("block_timeout must be >= 0 (or None to wait as long as it takes)")
        if self.retry.attempts < 1:
            raise ValueError("retry.attempts must be at least 1")
