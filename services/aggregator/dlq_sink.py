"""The dead-letter edge of the aggregator: one small Protocol, an aiokafka implementation and an
in-memory one (tests/integration/test_dlq_sink.py runs both through the same spec).

Bulk, not per letter: the messages of a batch are handed to the producer one after another (so
at most one caller waits while a partition's batch drains), at most IN_FLIGHT unacknowledged at
once, and awaited together at the end. Awaiting one send per letter side by side made every
waiter wake on every drain: a storm of 50,000 letters spent minutes of CPU in the producer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.aggregator.schemas import DeadLetterMessage
from shared.errors import BrokerUnavailable
from shared.kafka import create_async_producer
from shared.logs import log_event
from shared.settings import Settings

logger = logging.getLogger("meterline.aggregator")

IN_FLIGHT = 1000
SEND_TIMEOUT_SECONDS = 30.0


class DeadLetterSink(Protocol):
    async def send_all(self, messages: Sequence[DeadLetterMessage]) -> None:
        """Return once the broker acknowledged every message; BrokerUnavailable otherwise (the
        caller retries all of them: the DLQ is at least once)."""
        ...

    async def close(self, wait_seconds: float) -> None:
        """Stop, waiting at most `wait_seconds` for anything still unacknowledged."""
        ...


@dataclass
class InMemoryDeadLetterSink:
    """Keeps what was sent; `available = False` behaves like a broker that is down."""

    topic: str
    messages: list[DeadLetterMessage] = field(default_factory=list)
    available: bool = True
    closed: bool = False

    async def send_all(self, messages: Sequence[DeadLetterMessage]) -> None:
        if not self.available:
            raise BrokerUnavailable(f"dead letters to {self.topic} were not acknowledged")
        self.messages.extend(messages)

    async def close(self, wait_seconds: float) -> None:
        self.closed = True


class KafkaDeadLetterSink:
    """aiokafka's producer (acks=all, idempotent), started by the first send on its loop."""

    def __init__(
        self,
        settings: Settings,
        *,
        topic: str | None = None,
        send_timeout: float = SEND_TIMEOUT_SECONDS,
    ) -> None:
        self.topic = topic or settings.dlq_topic
        self._settings = settings
        self._send_timeout = send_timeout
        self._producer: Any = None
        self._starting = asyncio.Lock()

    async def _started(self) -> Any:
        async with self._starting:
            if self._producer is None:
                producer = create_async_producer(
                    self._settings,
                    client_id="meterline-dlq",
                    acks="all",
                    enable_idempotence=True,
                    linger_ms=5,
                    max_batch_size=1024 * 1024,
                    max_request_size=8 * 1024 * 1024,
                    request_timeout_ms=int(self._send_timeout * 1000),
                )
                try:
                    await producer.start()
                except BaseException:
                    await _stop_quietly(producer, 1.0)
                    raise
                self._producer = producer
            return self._producer

    async def send_all(self, messages: Sequence[DeadLetterMessage]) -> None:
        if not messages:
            return
        try:
            await asyncio.wait_for(self._send_all(messages), self._send_timeout)
        except (TimeoutError, OSError) as exc:
            raise BrokerUnavailable(
                f"dead letters to {self.topic} were not acknowledged: {type(exc).__name__}"
            ) from None
        except Exception as exc:
            from aiokafka.errors import KafkaError

            if isinstance(exc, KafkaError):
                raise BrokerUnavailable(
                    f"dead letters to {self.topic} were not acknowledged: {exc!r}"[:300]
                ) from None
            raise

    async def _send_all(self, messages: Sequence[DeadLetterMessage]) -> None:
        producer = await self._started()
        pending: list[asyncio.Future[Any]] = []
        for message in messages:
            # send() returns once the message is in the producer's buffer; awaiting it one at a
            # time keeps a single waiter on a full partition buffer.
            pending.append(
                await producer.send(
                    self.topic, message.value, key=message.key, headers=message.headers
                )
            )
            if len(pending) >= IN_FLIGHT:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)

    async def close(self, wait_seconds: float) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await _stop_quietly(producer, wait_seconds)


async def _stop_quietly(producer: Any, wait_seconds: float) -> None:
    try:
        await asyncio.wait_for(producer.stop(), wait_seconds)
    except Exception as exc:
        # Unacknowledged letters are resent with their batch after a restart (it was not acked).
        log_event(logger, "dlq_producer_stop_failed", logging.WARNING, error=repr(exc)[:200])
