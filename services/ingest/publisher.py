"""The Kafka edge of ingest: one small Protocol, a kafka-python implementation and an in-memory one.

Bound on a request's wait: `publish_all` waits at most `wait_seconds` (settings
.ingest_publish_timeout_seconds, default 5) for the broker's acknowledgement of every message, then
raises BrokerUnavailable (503 with Retry-After). A message answered 503 may still reach the topic
later (the producer keeps retrying until its delivery timeout); the client's retry carries the same
event ids and the aggregator's ledger counts each id once.

Never on the event loop: kafka-python's send() may block (waiting up to max_block_ms for a topic's
metadata, or for its I/O thread to take a wakeup when that thread is stuck), so one thread of the
publisher's own makes every send() call, in arrival order, and a request only awaits its future.
A request whose deadline passed while it waited for that thread is not sent at all (it was
already answered 503). Memory is bounded too: kafka-python 3 buffers without limit, so once
MAX_PENDING_BYTES of values wait for acknowledgement (a broker outage under load) requests get
503 at once.

Recovery: kafka-python's producer can wedge after a broker restart under load (its I/O thread
stops sending, every future times out). So when nothing has been acknowledged for RESET_AFTER
seconds while the broker accepts connections, the producer is thrown away and a new one made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.errors import BrokerUnavailable
from shared.kafka import create_producer
from shared.logs import log_event
from shared.settings import Settings
from shared.topics import ensure_topics

logger = logging.getLogger("meterline.ingest")

RETRY_AFTER_SECONDS = 2
RESET_AFTER = 10.0
# What kafka-python 2's buffer_memory bounded by default; per worker process.
MAX_PENDING_BYTES = 32 * 1024 * 1024


class EventPublisher(Protocol):
    async def publish_all(
        self,
        topic: str,
        key: bytes,
        values: Sequence[bytes],
        timestamp_ms: int,
        *,
        wait_seconds: float,
    ) -> None:
        """Return once the broker acknowledged every value; BrokerUnavailable otherwise."""
        ...

    async def ready(self) -> bool:
        """True if the broker can be reached now."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PublishedRecord:
    topic: str
    key: bytes
    value: bytes
    timestamp_ms: int


@dataclass
class InMemoryPublisher:
    """Keeps what was published; `available = False` makes it behave like a broker that is down."""

    records: list[PublishedRecord] = field(default_factory=list)
    available: bool = True

    async def publish_all(
        self,
        topic: str,
        key: bytes,
        values: Sequence[bytes],
        timestamp_ms: int,
        *,
        wait_seconds: float,
    ) -> None:
        if not self.available:
            raise BrokerUnavailable("broker did not acknowledge in time")
        self.records.extend(PublishedRecord(topic, key, v, timestamp_ms) for v in values)

    async def ready(self) -> bool:
        return self.available

    async def close(self) -> None:
        return None


def producer_config(settings: Settings) -> dict[str, Any]:
    timeout_ms = int(settings.ingest_publish_timeout_seconds * 1000)
    request_timeout_ms = max(1000, min(timeout_ms, 30_000))
    return {
        "acks": "all",
        "enable_idempotence": True,
        # A few milliseconds of linger let concurrent requests share one produce request.
        "linger_ms": 2,
        "batch_size": 256 * 1024,
        "request_timeout_ms": request_timeout_ms,
        # Records we stopped waiting for (503) are given up soon after, so a long outage does
        # not pile them up in memory; the client's retry re-sends them with the same ids.
        "delivery_timeout_ms": max(request_timeout_ms + 1000, timeout_ms * 3),
        "max_block_ms": timeout_ms,
        "retry_backoff_ms": 100,
        "reconnect_backoff_ms": 50,
        "reconnect_backoff_max_ms": 1000,
    }


@dataclass(frozen=True, slots=True)
class _SendJob:
    """One request's values, for the send thread to hand to `producer`."""

    producer: Any
    topic: str
    key: bytes
    values: Sequence[bytes]
    timestamp_ms: int
    deadline: float  # time.monotonic() after which nobody waits for it
    done: Callable[[BaseException | None], None]  # called once, from any thread
    released: Callable[[int], None]  # each value's size, once kafka-python lets it go


class _SendThread:
    """The one caller of producer.send(), so that whatever it blocks on never blocks the loop."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_SendJob | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="meterline-send", daemon=True)
        self._thread.start()

    def submit(self, job: _SendJob) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            _send(job)


def _send(job: _SendJob) -> None:
    if time.monotonic() >= job.deadline:
        # Answered 503 while it waited here: sending it now would only hold memory.
        for value in job.values:
            job.released(len(value))
        job.done(TimeoutError("not sent before the publish timeout"))
        return
    remaining = [len(job.values)]
    lock = threading.Lock()

    def settled(size: int, error: BaseException | None) -> None:
        job.released(size)
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if error is not None or last:
            job.done(error)

    for index, value in enumerate(job.values):
        try:
            pending = job.producer.send(
                job.topic, value=value, key=job.key, timestamp_ms=job.timestamp_ms
            )
        except Exception as exc:
            for unsent in job.values[index:]:
                job.released(len(unsent))
            job.done(exc)
            return
        size = len(value)
        pending.add_callback(lambda _metadata, size=size: settled(size, None))
        pending.add_errback(lambda error, size=size: settled(size, error))


class KafkaPublisher:
    """kafka-python's producer (acks=all, idempotent), its futures bridged to asyncio."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._bootstrap = [
            _host_port(server) for server in settings.kafka_bootstrap_servers.split(",")
        ]
        self._producer: Any = None
        self._topics: list[str] = []
        self._last_success = time.monotonic()
        self._resetting = False
        self._background: set[asyncio.Task[None]] = set()
        self._sends = _SendThread()
        self._pending_bytes = 0  # touched on the loop's thread only

    async def connect(self, topics: Sequence[str], *, retry_seconds: float = 1.0) -> None:
        """Create the topics if absent, then the producer, retrying until the broker answers.

        Runs in the background from start-up: until it succeeds, publish_all answers
        BrokerUnavailable at once, so the service starts whether or not the broker is up.
        """
        self._topics = list(topics)
        while True:
            try:
                created = await asyncio.to_thread(ensure_topics, self._settings)
                producer = await asyncio.to_thread(
                    create_producer,
                    self._settings,
                    client_id="meterline-ingest",
                    **producer_config(self._settings),
                )
                for topic in topics:
                    await asyncio.to_thread(producer.partitions_for, topic)
            except Exception as exc:
                log_event(logger, "broker_connect_failed", logging.WARNING, error=str(exc)[:200])
                await asyncio.sleep(retry_seconds)
                continue
            self._producer = producer
            self._last_success = time.monotonic()
            log_event(logger, "broker_connected", topics=list(topics), created=created)
            return

    async def publish_all(
        self,
        topic: str,
        key: bytes,
        values: Sequence[bytes],
        timestamp_ms: int,
        *,
        wait_seconds: float,
    ) -> None:
        if self._producer is None:
            raise self._unavailable(ConnectionError("not connected to the broker yet"))
        size = sum(len(value) for value in values)
        if self._pending_bytes + size > MAX_PENDING_BYTES:
            raise self._unavailable(BufferError("too much is waiting for the broker already"))
        loop = asyncio.get_running_loop()
        acknowledged: asyncio.Future[None] = loop.create_future()

        def done(error: BaseException | None) -> None:
            _on_loop(loop, _settle, acknowledged, error)

        def released(value_size: int) -> None:
            _on_loop(loop, self._release, value_size)

        self._pending_bytes += size
        deadline = time.monotonic() + wait_seconds
        self._sends.submit(
            _SendJob(self._producer, topic, key, values, timestamp_ms, deadline, done, released)
        )
        try:
            await asyncio.wait_for(acknowledged, max(0.001, deadline - time.monotonic()))
        except Exception as exc:
            await self._maybe_reset()
            raise self._unavailable(exc) from None
        self._last_success = time.monotonic()

    def _release(self, size: int) -> None:
        self._pending_bytes -= size

    async def _maybe_reset(self) -> None:
        """Replace a producer that acknowledged nothing for RESET_AFTER seconds while the broker
        is reachable; requests in the meantime get 503 at once."""
        stalled = time.monotonic() - self._last_success > RESET_AFTER
        if self._resetting or self._producer is None or not stalled:
            return
        if not await self.ready():
            return  # the broker is down: a new producer would not do better
        self._resetting = True
        old, self._producer = self._producer, None
        log_event(logger, "producer_reset", logging.WARNING, stalled_seconds=RESET_AFTER)
        # Its unacknowledged records were answered 503; close it without waiting on them.
        threading.Thread(target=_close_quietly, args=(old, 0), daemon=True).start()
        task = asyncio.create_task(self._reconnect())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reconnect(self) -> None:
        try:
            await self.connect(self._topics)
        finally:
            self._resetting = False

    def _unavailable(self, exc: BaseException) -> BrokerUnavailable:
        reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
        log_event(logger, "publish_failed", logging.WARNING, reason=reason, error=str(exc)[:200])
        return BrokerUnavailable(
            f"the event broker did not acknowledge in time ({reason}); retry with the same ids"
        )

    async def ready(self) -> bool:
        if self._producer is None and not self._resetting:
            return False
        for host, port in self._bootstrap:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
            except (OSError, TimeoutError):
                continue
            writer.close()
            return True
        return False

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        self._sends.stop()
        if self._producer is not None:
            await asyncio.to_thread(_close_quietly, self._producer, 5)


def _close_quietly(producer: Any, timeout: float) -> None:
    try:
        producer.close(timeout)
    except Exception as exc:
        log_event(logger, "producer_close_failed", logging.WARNING, error=str(exc)[:200])


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """Run `callback` on the loop's thread; nothing if the loop is gone (nobody is waiting)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    """On the loop's thread: the request's future, unless it already gave up waiting."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(None)


def _host_port(server: str) -> tuple[str, int]:
    host, _, port = server.strip().rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port or 9092)
