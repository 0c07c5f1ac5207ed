"""AsyncMeterlineClient: the same buffer and guarantees as MeterlineClient, for one asyncio loop.

    async with AsyncMeterlineClient("http://127.0.0.1:8080", api_key) as client:
        await client.record("api_calls")

A background task sends every `flush_interval` and whenever a batch is full; one sender at a
time takes the oldest events, and what was not accepted goes back to the front of the buffer.
At interpreter exit (the loop is usually gone by then) whatever is still buffered or was in flight
is sent with a short-lived synchronous connection, with the same ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timezone
from types import TracebackType

import httpx

from meterline_client import lifecycle
from meterline_client.client import EVENTS_PATH, JSON_HEADERS, deliver
from meterline_client.delivery import Delivery, RetryPolicy, read_error, take_batch
from meterline_client.errors import (
    BufferFull,
    ClientClosed,
    EventsRejected,
    MeterlineClientError,
    RejectedEvent,
)
from meterline_client.events import PendingEvent, Quantity, encode_documents, make_event
from meterline_client.options import ClientOptions, OnRejected
from meterline_client.usage import UsageReport, parse_usage, usage_params

logger = logging.getLogger("meterline_client")


class AsyncMeterlineClient:
    """A buffered asyncio client of the ingest API. See ClientOptions for every option."""

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
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
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
        self._http = httpx.AsyncClient(
            base_url=self._base_url,
            timeout=self.options.timeout,
            headers=self._headers(),
            transport=self._transport,
        )
        self._buffer: deque[PendingEvent] = deque()
        # Batches taken off the buffer and not yet settled: the exit flush sends them too.
        self._inflight: list[list[PendingEvent]] = []
        self._rejected: list[RejectedEvent] = []
        self._send_lock = asyncio.Lock()
        self._room = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"}

    # -- recording ------------------------------------------------------------------------------

    async def record(
        self,
        metric: str,
        quantity: Quantity = 1,
        *,
        timestamp: datetime | None = None,
        project_id: uuid.UUID | str | None = None,
        properties: Mapping[str, str] | None = None,
        event_id: str | None = None,
    ) -> str:
        """Buffer one event and return its id; waits while the buffer is full (BufferFull after
        block_timeout)."""
        event = make_event(
            metric,
            quantity,
            timestamp=timestamp or datetime.now(timezone.utc),
            project_id=project_id,
            properties=properties,
            event_id=event_id,
        )
        await self._append(event)
        return event.id

    async def _append(self, event: PendingEvent) -> None:
        options = self.options
        self._ensure_flusher()
        if self.pending >= options.max_buffer and self._task is None:
            await self._flush_quietly()
        deadline = (
            None if options.block_timeout is None else time.monotonic() + options.block_timeout
        )
        while self.pending >= options.max_buffer:
            if self._closed:
                raise ClientClosed("the client is closed")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise BufferFull(
                    f"{options.max_buffer} events are waiting to be sent "
                    f"(last error: {self.last_error}); this event was not recorded"
                )
            self._room.clear()
            self._wake.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._room.wait(), remaining)
        if self._closed:
            raise ClientClosed("the client is closed")
        self._buffer.append(event)
        if len(self._buffer) >= options.batch_size:
            if self._task is not None:
                self._wake.set()
            else:
                await self._flush_quietly(limit=options.batch_size)

    @property
    def pending(self) -> int:
        return len(self._buffer) + sum(len(batch) for batch in self._inflight)

    # -- sending --------------------------------------------------------------------------------

    async def flush(self, timeout: float | None = None) -> int:
        """Send everything recorded so far; like MeterlineClient.flush()."""
        deadline = None if timeout is None else time.monotonic() + timeout
        accepted = await self._send_buffered(limit=self.pending, deadline=deadline)
        rejected, self._rejected = self._rejected, []
        if rejected:
            raise EventsRejected(rejected)
        return accepted

    async def send(self, events: Sequence[Mapping[str, object]]) -> int:
        """POST ready-made events now, bypassing the buffer; like MeterlineClient.send()."""
        delivery = await self._deliver(encode_documents(list(events)), deadline=None)
        if delivery.rejected:
            raise EventsRejected(delivery.rejected)
        if delivery.error is not None:
            raise delivery.error
        return delivery.accepted

    async def _send_buffered(self, *, limit: int, deadline: float | None = None) -> int:
        accepted = 0
        async with self._send_lock:
            while limit > 0:
                if deadline is not None and time.monotonic() >= deadline:
                    raise MeterlineClientError(f"flush ran out of time; {self.pending} pending")
                batch = take_batch(self._buffer, min(self.options.batch_size, limit))
                if not batch:
                    break
                limit -= len(batch)
                self._inflight.append(batch)
                try:
                    delivery = await self._deliver(batch, deadline=deadline)
                except BaseException:
                    # Cancelled or broken mid-send: the batch goes back, to be sent again.
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
        self._inflight.remove(batch)
        self._buffer.extendleft(reversed(unsent))
        self._room.set()

    async def _deliver(self, events: list[PendingEvent], *, deadline: float | None) -> Delivery:
        delivery = Delivery(events, self.options.retry, deadline=deadline)
        while (body := delivery.next_body()) is not None:
            try:
                response = await self._http.post(EVENTS_PATH, content=body, headers=JSON_HEADERS)
            except httpx.TransportError as exc:
                delay = delivery.transport_failed(exc)
            else:
                delay = delivery.answered(response.status_code, response.headers, response.content)
            if delay > 0:
                await self._sleep(delay)
        return delivery

    def _report(self, rejected: list[RejectedEvent]) -> None:
        logger.warning(
            "meterline_client_events_rejected",
            extra={"count": len(rejected), "first": rejected[0].reason},
        )
        if self.options.on_rejected is not None:
            self.options.on_rejected(rejected)
        else:
            self._rejected.extend(rejected)

    # -- the background flush -------------------------------------------------------------------

    def _ensure_flusher(self) -> None:
        if self.options.flush_interval is None or self._closed:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run_flusher())

    async def _run_flusher(self) -> None:
        interval = self.options.flush_interval
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            await self._flush_quietly()

    async def _flush_quietly(self, limit: int | None = None) -> None:
        try:
            await self._send_buffered(limit=self.pending if limit is None else limit)
        except MeterlineClientError as exc:
            logger.warning("meterline_client_flush_failed", extra={"error": str(exc)})
        except Exception:
            logger.exception("meterline_client_flush_failed")

    # -- reading --------------------------------------------------------------------------------

    async def usage(
        self,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        metric: str | None = None,
        group_by: str | Sequence[str] | None = None,
        granularity: str = "hour",
        filters: Mapping[str, str] | None = None,
    ) -> UsageReport:
        params = usage_params(
            start=start,
            end=end,
            metric=metric,
            group_by=group_by,
            granularity=granularity,
            filters=filters,
        )
        response = await self._http.get("/v1/usage", params=params)
        if response.status_code != 200:
            error = read_error(response.status_code, response.content)
            raise MeterlineClientError(
                f"{response.status_code} {error.message}",
                status=response.status_code,
                code=error.code,
            )
        return parse_usage(response.content)

    # -- closing --------------------------------------------------------------------------------

    async def aclose(self, timeout: float | None = None) -> None:
        """Stop the background task, send what is buffered, close the connection pool."""
        if self._closed:
            return
        self._closed = True
        self._room.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        try:
            await self.flush(timeout)
        finally:
            await self._http.aclose()
            lifecycle.forget(self)

    async def __aenter__(self) -> AsyncMeterlineClient:
        self._ensure_flusher()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.aclose()
            return
        try:
            await self.aclose()
        except MeterlineClientError as flush_error:
            logger.warning(
                "meterline_client_flush_on_error_failed", extra={"error": str(flush_error)}
            )

    def _close_at_exit(self) -> None:
        """Interpreter exit: the loop is gone, so send the rest over a synchronous pool."""
        if self._closed:
            return
        self._closed = True
        events = [event for batch in self._inflight for event in batch] + list(self._buffer)
        self._inflight.clear()
        self._buffer.clear()
        if not events:
            return
        deadline = time.monotonic() + self.options.exit_timeout
        with httpx.Client(
            base_url=self._base_url, timeout=self.options.timeout, headers=self._headers()
        ) as http:
            delivery = deliver(http, events, self.options.retry, deadline=deadline)
        self._buffer.extend(delivery.unsent)
        if delivery.rejected:
            self._report(delivery.rejected)
        if delivery.error is not None:
            raise delivery.error

    def _after_fork_in_child(self) -> None:
        closed = self._closed
        self._start()
        self._closed = closed
