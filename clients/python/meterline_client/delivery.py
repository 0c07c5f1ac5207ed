"""Delivering one batch, without I/O: what to send next, what an answer means, how long to wait.

Both clients (threads and asyncio) drive the same `Delivery`: ask `next_body()`, POST it, feed the
answer to `answered()` (or a network failure to `transport_failed()`), sleep the delay it returns,
repeat until `next_body()` is None. A batch ends in one of three ways for each of its events:
accepted (202), refused by name (422/403 naming its index: reported, never sent again), or kept
(retries ran out or the service refused the request as a whole: `unsent`, for a later flush with the
same ids). Nothing is ever dropped without being reported.
"""

from __future__ import annotations

import json
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from meterline_client.errors import MeterlineClientError, RejectedEvent
from meterline_client.events import PendingEvent

MAX_BATCH_EVENTS = 1000
#: The service refuses bodies over 1 MiB (413); batches stay under it with room to spare.
MAX_BATCH_BYTES = 1_000_000
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
_ENVELOPE = len(b'{"events":[]}')


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Full-jitter exponential backoff, never sooner than the service's Retry-After."""

    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 10.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))  # noqa: S311
        return max(backoff, retry_after or 0.0)


def take_batch(
    buffer: deque[PendingEvent], max_events: int, max_bytes: int = MAX_BATCH_BYTES
) -> list[PendingEvent]:
    """Pop the oldest events that fit one request (by count and by encoded size)."""
    batch: list[PendingEvent] = []
    size = _ENVELOPE
    while buffer and len(batch) < max_events:
        grown = size + len(buffer[0].body) + (1 if batch else 0)
        if batch and grown > max_bytes:
            break
        batch.append(buffer.popleft())
        size = grown
    return batch


def batch_body(events: Sequence[PendingEvent]) -> bytes:
    return b'{"events":[' + b",".join(event.body for event in events) + b"]}"


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date; None if absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


@dataclass(frozen=True, slots=True)
class ErrorBody:
    code: str | None
    message: str
    details: object


def read_error(status: int, content: bytes) -> ErrorBody:
    """The service's {"error": {"code", "message", "details"}}, or the raw text of anything else."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code = error.get("code")
        return ErrorBody(
            code if isinstance(code, str) else None,
            str(error.get("message", "")),
            error.get("details"),
        )
    return ErrorBody(None, content[:200].decode(errors="replace"), None)


def _indexed_reasons(details: object, size: int) -> dict[int, str]:
    """index -> reason from details like [{"index": 3, "reason": "..."}], within the batch."""
    reasons: dict[int, str] = {}
    if isinstance(details, list):
        for item in details:
            if isinstance(item, dict):
                index = item.get("index")
                if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < size:
                    reasons[index] = str(item.get("reason", ""))
    return reasons


class Delivery:
    """One batch on its way; see the module docstring for the protocol."""

    def __init__(
        self,
        events: Sequence[PendingEvent],
        policy: RetryPolicy,
        *,
        deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Sub-batches still to send, oldest first: a batch is split when the service cannot take
        # it whole (413) or refuses it without naming the events (422 without indexes).
        self._queue: list[list[PendingEvent]] = [list(events)] if events else []
        self._policy = policy
        self._deadline = deadline
        self._clock = clock
        self._attempt = 0
        self.accepted = 0
        self.rejected: list[RejectedEvent] = []
        self.unsent: list[PendingEvent] = []
        self.error: MeterlineClientError | None = None

    def next_body(self) -> bytes | None:
        if self.error is not None or not self._queue:
            return None
        return batch_body(self._queue[0])

    def answered(self, status: int, headers: Mapping[str, str], content: bytes) -> float:
        """Take the service's answer to the last body; the seconds to wait before the next."""
        batch = self._queue[0]
        if 200 <= status < 300:
            self.accepted += len(batch)
            self._done_with_first()
            return 0.0
        if status in RETRYABLE_STATUS:
            return self._again(retry_after_seconds(headers.get("retry-after")))
        error = read_error(status, content)
        if status in (403, 422):
            reasons = _indexed_reasons(error.details, len(batch))
            if reasons:
                self._reject(batch, reasons, status)
                return 0.0
            if status == 422 and len(batch) == 1:
                self._reject(batch, {0: error.message}, status)
                return 0.0
            if status == 422:
                self._split_first()
                return 0.0
        if status == 413 and len(batch) > 1:
            self._split_first()
            return 0.0
        return self._fail(
            MeterlineClientError(
                f"{status} {error.message}".strip(), status=status, code=error.code
            )
        )

    def transport_failed(self, error: Exception) -> float:
        return self._again(None, reason=f"{type(error).__name__}: {error}")

    # -- the steps ------------------------------------------------------------------------------

    def _done_with_first(self) -> None:
        self._queue.pop(0)
        self._attempt = 0

    def _reject(self, batch: list[PendingEvent], reasons: dict[int, str], status: int) -> None:
        """Report the named events and send the rest of the batch again, at once."""
        for index, reason in sorted(reasons.items()):
            event = batch[index]
            self.rejected.append(RejectedEvent(event.id, status, reason, event.document()))
        rest = [event for index, event in enumerate(batch) if index not in reasons]
        if rest:
            self._queue[0] = rest
            self._attempt = 0
        else:
            self._done_with_first()

    def _split_first(self) -> None:
        batch = self._queue[0]
        half = len(batch) // 2
        self._queue[0:1] = [batch[:half], batch[half:]]
        self._attempt = 0

    def _again(self, retry_after: float | None, reason: str = "") -> float:
        self._attempt += 1
        if self._attempt >= self._policy.attempts:
            detail = f" (last: {reason})" if reason else ""
            return self._fail(
                MeterlineClientError(f"gave up after {self._attempt} attempts{detail}")
            )
        delay = self._policy.delay(self._attempt - 1, retry_after)
        if self._deadline is not None and self._clock() + delay > self._deadline:
            return self._fail(MeterlineClientError("out of time before the service accepted"))
        return delay

    def _fail(self, error: MeterlineClientError) -> float:
        self.error = error
        self.unsent = [event for batch in self._queue for event in batch]
        self._queue.clear()
        return 0.0
