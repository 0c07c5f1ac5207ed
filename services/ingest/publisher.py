"""The Kafka edge of ingest: one small Protocol, a kafka-python implementation and an in-memory one.

Bound on a request's wait: `publish_all` waits at most `wait_seconds` (settings
.ingest_publish_timeout_seconds, default 5) for the broker's acknowledgement of every message, then
raises BrokerUnavailable (503 with Retry-After). A message answered 503 may still reach the topic
later (the producer keeps retrying until its delivery timeout); the client's retry carries the same
event ids and the aggregator's ledger counts each id once.

Recovery: kafka-python's producer can wedge after a broker restart under load (its I/O thread
stops sending, every future times out). So when nothing has been acknowledged for RESET_AFTER
seconds while the broker accepts connections, the producer is thrown away and a new one made.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.errors import BrokerUnavailable
from shared.logs import log_event
from shared.settings import Settings
from shared.topics import ensure_topics

logger = logging.getLogger("meterline.ingest")

RETRY_AFTER_SECONDS = 2
RESET_AFTER = 10.0


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
        "bootstrap_servers": settings.kafka_bootstrap_servers.split(","),
        "client_id": "meterline-ingest",
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


class KafkaPublisher:
    """kafka-python's producer (acks=all, idempotent), its futures bridged to asyncio."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._bootstrap = [
            _host_port(server) for server in settings.kafka_bootstrap_servers.split(",")
        ]
        self._producer: Any = None
        self._known_topics: set[str] = set()
        self._topics: list[str] = []
        self._last_success = time.monotonic()
        self._resetting = False
        self._background: set[asyncio.Task[None]] = set()

    async def connect(self, topics: Sequence[str], *, retry_seconds: float = 1.0) -> None:
        """Create the topics if absent, then the producer, retrying until the broker answers.

        Runs in the background from start-up: until it succeeds, publish_all answers
        BrokerUnavailable at once, so the service starts whether or not the broker is up.
        """
        from kafka import KafkaProducer

        self._topics = list(topics)
        while True:
            try:
                created = await asyncio.to_thread(ensure_topics, self._settings)
                producer = await asyncio.to_thread(KafkaProducer, **producer_config(self._settings))
                for topic in topics:
                    await asyncio.to_thread(producer.partitions_for, topic)
                    self._known_topics.add(topic)
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
        deadline = time.monotonic() + wait_seconds
        loop = asyncio.get_running_loop()
        futures = []
        for value in values:
            try:
                if topic in self._known_topics:
                    pending = self._producer.send(
                        topic, value=value, key=key, timestamp_ms=timestamp_ms
                    )
                else:
                    # Until the topic's metadata is known, send() may block for it: not here.
                    pending = await asyncio.wait_for(
                        asyncio.to_thread(
                            self._producer.send,
                            topic,
                            value=value,
                            key=key,
                            timestamp_ms=timestamp_ms,
                        ),
                        max(0.001, deadline - time.monotonic()),
                    )
                    self._known_topics.add(topic)
            except Exception as exc:
                await self._maybe_reset()
                raise self._unavailable(exc) from None
            futures.append(_bridge(pending, loop))
        try:
            await asyncio.wait_for(
                asyncio.gather(*futures), max(0.001, deadline - time.monotonic())
            )
        except Exception as exc:
            await self._maybe_reset()
            raise self._unavailable(exc) from None
        self._last_success = time.monotonic()

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
        if self._producer is not None:
            await asyncio.to_thread(_close_quietly, self._producer, 5)


def _close_quietly(producer: Any, timeout: float) -> None:
    try:
        producer.close(timeout)
    except Exception as exc:
        log_event(logger, "producer_close_failed", logging.WARNING, error=str(exc)[:200])


def _bridge(pending: Any, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
    """An asyncio future settled (on the loop's thread) when the producer's future settles."""
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    pending.add_callback(lambda metadata: loop.call_soon_threadsafe(settle, metadata, None))
    pending.add_errback(lambda error: loop.call_soon_threadsafe(settle, None, error))
    return future


def _host_port(server: str) -> tuple[str, int]:
    host, _, port = server.strip().rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port or 9092)
