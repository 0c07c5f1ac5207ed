"""What the client raises: one root, MeterlineClientError, and the few cases a caller handles."""

from __future__ import annotations

from dataclasses import dataclass


class MeterlineClientError(Exception):
    """A request the service refused, or retries that ran out. Nothing buffered was dropped: the
    events of a failed flush stay buffered and are sent again, with the same ids, later."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class RejectedEvent:
    """An event the service refused (422, or 403 for a project the key may not write), with the
    service's reason. It is never sent again; every other event of its batch is."""

    id: str
    status: int
    reason: str
    event: dict[str, object]


class EventsRejected(MeterlineClientError):
    """Raised once, by the next flush()/close(), for the events the service refused when no
    `on_rejected` callback was given. Every other event was sent."""

    def __init__(self, rejected: list[RejectedEvent]) -> None:
        reasons = "; ".join(f"{r.id}: {r.reason}" for r in rejected[:5])
        more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
        super().__init__(
            f"the service refused {len(rejected)} event(s): {reasons}{more}",
            status=rejected[0].status if rejected else None,
            code="rejected",
        )
        self.rejected = rejected


class BufferFull(MeterlineClientError):
    """record() waited `block_timeout` seconds for room in a buffer of `max_buffer` events (the
    service is down or slower than the events come); this event was not recorded."""


class ClientClosed(MeterlineClientError):
    """record() on a client that was closed."""
