"""The console's long-lived clients of what it watches: one HTTP client for the services' /healthz
and /metrics, one dead-letter reader, and one reader of the aggregator group's offsets. Built once
per console process (and once in its sampler), because a page that built its own would pay for
them on every request (an SSL context; Kafka's connection, metadata and version probes: tens of
milliseconds of Python), and closed with the console."""

from __future__ import annotations

import httpx

from services.aggregator.consumer_lag import PartitionLagReader
from services.aggregator.dead_letters import DeadLetterReader
from shared.settings import Settings

PROBE_TIMEOUT_SECONDS = 2.0


class LiveReaders:
    def __init__(self, settings: Settings) -> None:
        from services.aggregator.app import app_id  # imports faust: only when a console starts

        self.http = httpx.Client(timeout=PROBE_TIMEOUT_SECONDS)
        self.dead_letters = DeadLetterReader(settings)
        self.consumer_group = app_id(settings)
        self.lag = PartitionLagReader(settings, self.consumer_group, settings.events_topic)

    def close(self) -> None:
        self.lag.close()
        self.dead_letters.close()
        self.http.close()
