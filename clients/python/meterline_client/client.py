"""MeterlineClient: record events from any number of threads; a background thread sends them.

    with MeterlineClient("http://127.0.0.1:8080", api_key) as client:
        client.record("api_calls")                       # buffered; its id is made now
        client.record("storage_gb", quantity="12.5", project_id=project)

How the buffer stays safe, in order:
1. record() appends under one lock; a full buffer makes it wait (then BufferFull), never drop.
2. One sender at a time (the send lock) takes the oldest events off the buffer, so two flushes
   never send or remove the same events.
3. What the service did not accept and did not refuse by name goes back to the front of the
   buffer, in order, to be sent again later with the same ids (the pipeline counts each id once).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from types import TracebackType

import httpx

from meterline_client import lifecycle
from meterline_client.delivery import Delivery, RetryPolicy, read_error, take_batch
from meterline_client.errors import (
    BufferFull,
    ClientClosed,
    EventsRejected,
    MeterlineClientError,
    RejectedEvent,
)
from meterline_client.events import (
    PendingEvent,
    Quantity,
    encode_documents,
    make_event,
)
from meterline_client.options import ClientOptions, OnRejected
from meterline_client.usage import UsageReport, parse_usage, usage_params

logger = logging.getLogger("meterline_client")

EVENTS_PATH = "/v1/events"
JSON_HEADERS = {"Content-Type": "application/json"}


def deliver(
    http: httpx.Client,
    events: list[PendingEvent],
    policy: RetryPolicy,
    *,
    deadline: float | None,
    sleep: Callable[[float], None] = time.sleep,
) -> Delivery:
    """Drive one Delivery to its end over a synchronous connection pool."""
    delivery = Delivery(events, policy, deadline=deadline)
    while (body := delivery.next_body()) is not None:
        try:
            response = http.post(EVENTS_PATH, content=body, headers=JSON_HEADERS)
        except httpx.TransportError as exc:
            delay = delivery.transport_failed(exc)
        else:
            delay = delivery.answered(response.status_code, response.headers, response.content)
        if delay > 0:
            sleep(delay)
    return delivery


class MeterlineClient:
    """A thread-safe, buffered client of the ingest API. See ClientOptions for every option."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        batch_size: int = 1000,
        flush_interval: float | None = 1.0,
        max_buffer: int = 100_000,
        block_timeout: float | None = 30.0,
        on_rejected: OnRejected | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 10.0,
        exit_timeout: float = 5.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.options = ClientOptions(
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_buffer=max_buffer,
            block_timeout=block_timeout,
            timeout=timeout,
            exit_timeout=exit_timeout,
            retry=retry or RetryPolicy(),
            on_rejected=on_rejected,
        )
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._transport = transport
        self._sleep = sleep
        self._closed = False
        self.last_error: MeterlineClientError | None = None
        self._start()
        lifecycle.register(self)

    def _start(self) -> None:
        self._http = httpx.Client(
            base_url=self._base_url,
            timeout=self.options.timeout,
            headers={"Authorization": f"Bearer {self._api_key}"},
            transport=self._transport,
        )
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._send_lock = threading.Lock()
        self._buffer: deque[PendingEvent] = deque()
        self._inflight = 0
        self._rejected: list[RejectedEvent] = []
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        if self.options.flush_interval is not None:
            self._thread = threading.Thread(
                target=self._run_flusher, name="meterline-client-flush", daemon=True
            )
            self._thread.start()

    # -- recording ------------------------------------------------------------------------------

    def record(
        self,
        metric: str,
        quantity: Quantity = 1,
        *,
        timestamp: datetime | None = None,
        project_id: uuid.UUID | str | None = None,
        properties: Mapping[str, str] | None = None,
        event_id: str | None = None,
    ) -> str:
        """Buffer one event and return its id. Waits while the buffer is full (BufferFull after
        block_timeout); raises ValueError/TypeError at once for a float or unreadable quantity."""
        event = make_event(
            metric,
            quantity,
            timestamp=timestamp or datetime.now(timezone.utc),
            project_id=project_id,
            properties=properties,
            event_id=event_id,
        )
        self._append(event)
        return event.id

    def _append(self, event: PendingEvent) -> None:
        options = self.options
        if self._thread is None and self.pending >= options.max_buffer and not self._closed:
            # No background sender: this thread makes the room itself (or fails to, and waits).
            self._flush_quietly()
        with self._lock:
            deadline = (
                None if options.block_timeout is None else time.monotonic() + options.block_timeout
            )
            while len(self._buffer) + self._inflight >= options.max_buffer:
                if self._closed:
                    raise ClientClosed("the client is closed")
                self._wake.set()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise BufferFull(
                        f"{options.max_buffer} events are waiting to be sent "
                        f"(last error: {self.last_error}); this event was not recorded"
                    )
                self._room.wait(remaining)
            if self._closed:
                raise ClientClosed("the client is closed")
            self._buffer.append(event)
            full = len(self._buffer) >= options.batch_size
        if full:
            if self._thread is not None:
                self._wake.set()
            else:
                self._flush_quietly(limit=options.batch_size)

    @property
    def pending(self) -> int:
        """Events recorded and not yet accepted or refused (buffered or being sent)."""
        with self._lock:
            return len(self._buffer) + self._inflight

    # -- sending --------------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> int:
        """Send everything recorded so far; the number of events accepted.

        On failure the events not accepted stay buffered (same ids) and the error is raised.
        Events the service refused are passed to on_rejected, or raised here once as
        EventsRejected after the rest was sent.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        accepted = self._send_buffered(limit=self.pending, deadline=deadline)
        self._raise_rejected()
        return accepted

    def send(self, events: Sequence[Mapping[str, object]]) -> int:
        """POST ready-made events (ids chosen by the caller) now, bypassing the buffer; the number
        accepted. Refused events raise EventsRejected after the others were sent."""
        delivery = self._deliver(encode_documents(list(events)), deadline=None)
        if delivery.rejected:
            raise EventsRejected(delivery.rejected)
        if delivery.error is not None:
            raise delivery.error
        return delivery.accepted

    def _send_buffered(self, *, limit: int, deadline: float | None = None) -> int:
        """Send up to `limit` of the oldest events, one sender at a time (see the module doc)."""
        accepted = 0
        with self._send_lock:
            while limit > 0:
                if deadline is not None and time.monotonic() >= deadline:
                    raise MeterlineClientError(f"flush ran out of time; {self.pending} pending")
                with self._lock:
                    batch = take_batch(self._buffer, min(self.options.batch_size, limit))
                    self._inflight += len(batch)
                if not batch:
                    break
                limit -= len(batch)
                try:
                    delivery = self._deliver(batch, deadline=deadline)
                except BaseException:
                    self._settle(batch, batch)
                    raise
                self._settle(batch, delivery.unsent)
                accepted += delivery.accepted
                if delivery.rejected:
                    self._report(delivery.rejected)
                if delivery.error is not None:
                    self.last_error = delivery.error
                    raise delivery.error
        return accepted

    def _settle(self, batch: list[PendingEvent], unsent: list[PendingEvent]) -> None:
        with self._lock:
            self._inflight -= len(batch)
            self._buffer.extendleft(reversed(unsent))
            self._room.notify_all()

    def _deliver(self, events: list[PendingEvent], *, deadline: float | None) -> Delivery:
        return deliver(self._http, events, self.options.retry, deadline=deadline, sleep=self._sleep)

    def _report(self, rejected: list[RejectedEvent]) -> None:
        logger.warning(
            "meterline_client_events_rejected",
            extra={"count": len(rejected), "first": rejected[0].reason},
        )
        if self.options.on_rejected is not None:
            self.options.on_rejected(rejected)
        else:
            with self._lock:
                self._rejected.extend(rejected)

    def _raise_rejected(self) -> None:
        with self._lock:
            rejected, self._rejected = self._rejected, []
        if rejected:
            raise EventsRejected(rejected)

    # -- the background flush -------------------------------------------------------------------

    def _run_flusher(self) -> None:
        interval = self.options.flush_interval
        while True:
            self._wake.wait(interval)
            self._wake.clear()
            if self._stopping:
                return
            self._flush_quietly()

    def _flush_quietly(self, limit: int | None = None) -> None:
        """Send what is buffered; a failure is logged and kept in last_error, and the events
        stay buffered for the next flush."""
        try:
            self._send_buffered(limit=self.pending if limit is None else limit)
        except MeterlineClientError as exc:
            logger.warning("meterline_client_flush_failed", extra={"error": str(exc)})
        except Exception:
            logger.exception("meterline_client_flush_failed")

    # -- reading --------------------------------------------------------------------------------

    def usage(
        self,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        metric: str | None = None,
        group_by: str | Sequence[str] | None = None,
        granularity: str = "hour",
        filters: Mapping[str, str] | None = None,
    ) -> UsageReport:
        """GET /v1/usage: the usage the key may see in [start, end)."""
        params = usage_params(
            start=start,
            end=end,
            metric=metric,
            group_by=group_by,
            granularity=granularity,
            filters=filters,
        )
        response = self._http.get("/v1/usage", params=params)
        if response.status_code != 200:
            error = read_error(response.status_code, response.content)
            raise MeterlineClientError(
                f"{response.status_code} {error.message}",
                status=response.status_code,
                code=error.code,
            )
        return parse_usage(response.content)

    # -- closing --------------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Stop the background flush, send what is buffered, release the connection pool.
        Raises like flush() if something could not be sent (it stays in `pending`)."""
        with self._lock:
            already = self._closed
            self._closed = True
            self._room.notify_all()
        if already:
            return
        self._stop_flusher(timeout)
        try:
            self.flush(timeout)
        finally:
            self._http.close()
            lifecycle.forget(self)

    def _stop_flusher(self, timeout: float | None) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> MeterlineClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        # Leaving by an exception: what was recorded is still sent, and the exception goes on.
        try:
            self.close()
        except MeterlineClientError as flush_error:
            logger.warning(
                "meterline_client_flush_on_error_failed", extra={"error": str(flush_error)}
            )

    def _close_at_exit(self) -> None:
        if not self._closed:
            self.close(timeout=self.options.exit_timeout)

    def _after_fork_in_child(self) -> None:
        closed = self._closed
        self._start()
        self._closed = closed
        if closed:
            self._stop_flusher(0)
        # Inherited events belong to the parent, which sends them.
        logger.debug("meterline_client_reset_after_fork", extra={"pid": os.getpid()})
