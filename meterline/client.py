"""A small Python client for the ingest API: buffer events, send them in batches, retry safely.

    client = MeterlineClient("http://127.0.0.1:8080", api_key)
    client.record("api_calls")                       # buffered; id generated now
    client.record("storage_gb", quantity="12.5", project_id=project)
    client.flush()                                   # batches of up to 1000, retried

Every event gets its id when it is recorded, so a retry after a 429, a 503 or a network error
re-sends the same ids and the pipeline counts each once.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx

from shared.ids import uuid7

MAX_BATCH = 1000
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


class MeterlineClientError(Exception):
    """A request the service refused (4xx other than 429), or retries that ran out."""

    def __init__(self, message: str, *, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 10.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Full-jitter exponential backoff, never shorter than the server's Retry-After."""
        backoff = random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))  # noqa: S311
        return max(backoff, retry_after or 0.0)


class MeterlineClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        batch_size: int = MAX_BATCH,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH}")
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            headers={"Authorization": f"Bearer {api_key}"},
            transport=transport,
        )
        self._retry = retry or RetryPolicy()
        self._batch_size = batch_size
        self._sleep = sleep
        self._buffer: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def record(
        self,
        metric: str,
        quantity: int | str | Decimal = 1,
        *,
        timestamp: datetime | None = None,
        project_id: uuid.UUID | str | None = None,
        properties: Mapping[str, str] | None = None,
        event_id: str | None = None,
    ) -> str:
        """Buffer one event (sent by flush(), or as soon as a full batch is buffered); its id."""
        event = make_event(
            metric,
            quantity,
            timestamp=timestamp or datetime.now(UTC),
            project_id=project_id,
            properties=properties,
            event_id=event_id,
        )
        with self._lock:
            self._buffer.append(event)
            full = len(self._buffer) >= self._batch_size
        if full:
            self.flush()
        return str(event["id"])

    def flush(self) -> int:
        """Send everything buffered; the number of events accepted. On failure the events that
        were not accepted stay buffered, so a later flush() re-sends them with the same ids."""
        accepted = 0
        while True:
            with self._lock:
                batch = self._buffer[: self._batch_size]
            if not batch:
                return accepted
            accepted += self.send(batch)
            with self._lock:
                del self._buffer[: len(batch)]

    def send(self, events: Sequence[Mapping[str, Any]]) -> int:
        """POST events (at most 1000) as one batch, retrying 429/503/network errors."""
        if not 1 <= len(events) <= MAX_BATCH:
            raise ValueError(f"send 1..{MAX_BATCH} events at a time")
        body = {"events": list(events)}
        for attempt in range(self._retry.attempts):
            retry_after: float | None = None
            try:
                response = self._http.post("/v1/events", json=body)
            except httpx.TransportError:
                pass
            else:
                if response.status_code == 202:
                    return int(response.json()["accepted"])
                if response.status_code not in RETRYABLE_STATUS:
                    raise MeterlineClientError(
                        _message(response), status=response.status_code, body=_json(response)
                    )
                retry_after = _retry_after(response)
            if attempt + 1 < self._retry.attempts:
                self._sleep(self._retry.delay(attempt, retry_after))
        raise MeterlineClientError(f"gave up after {self._retry.attempts} attempts")

    def usage(self, **params: str) -> dict[str, Any]:
        response = self._http.get("/v1/usage", params=params)
        if response.status_code != 200:
            raise MeterlineClientError(
                _message(response), status=response.status_code, body=_json(response)
            )
        result: dict[str, Any] = response.json()
        return result

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._buffer)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MeterlineClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if exc_info[0] is None:
                self.flush()
        finally:
            self.close()


def make_event(
    metric: str,
    quantity: int | str | Decimal = 1,
    *,
    timestamp: datetime,
    project_id: uuid.UUID | str | None = None,
    properties: Mapping[str, str] | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    """One event as the API takes it; quantities travel as decimal strings (exact)."""
    if isinstance(quantity, float):
        raise TypeError("pass quantities as int, str or Decimal: floats are not exact")
    event: dict[str, Any] = {
        "id": event_id or str(uuid7()),
        "metric": metric,
        "quantity": str(quantity),
        "timestamp": timestamp.astimezone(UTC).isoformat().replace("+00:00", "Z"),
    }
    if project_id is not None:
        event["project_id"] = str(project_id)
    if properties:
        event["properties"] = dict(properties)
    return event


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _message(response: httpx.Response) -> str:
    body = _json(response)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return f"{response.status_code} {body['error'].get('message', '')}"
    return f"{response.status_code} {response.text[:200]}"
