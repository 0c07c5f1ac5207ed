"""The console's long-lived clients of what it watches: one HTTP client for the services' /healthz
and /metrics, and one dead-letter reader. Built once per console process, because a page that
built its own would pay for them on every request (an SSL context; Kafka's connection, metadata
and version probes: tens of milliseconds of Python), and closed with the console."""

from __future__ import annotations

import httpx

from services.aggregator.dead_letters import DeadLetterReader
from shared.settings import Settings

PROBE_TIMEOUT_SECONDS = 2.0


class LiveReaders:
    def __init__(self, settings: Settings) -> None:
        self.http = httpx.Client(timeout=PROBE_TIMEOUT_SECONDS)
        self.dead_letters = DeadLetterReader(settings)

    def close(self) -> None:
        self.dead_letters.close()
        self.http.close()
