"""Many threads recording through one MeterlineClient, through the real ingest service and the
real aggregator: usage_records hold exactly what was recorded, and each id was accepted once."""

from __future__ import annotations

import json
import threading
from collections import Counter
from decimal import Decimal
from pathlib import Path

import httpx
from sqlalchemy.engine import Engine

from meterline_client import MeterlineClient
from tests.aggregator_support import AggregatorProcess, totals, wait_for
from tests.ingest_support import make_tenant, run_ingest

THREADS = 8
EVENTS_PER_THREAD = 5_000


class AcceptedIds(httpx.HTTPTransport):
    """The real transport, keeping the ids of every request the service answered 202."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted: Counter[str] = Counter()
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        ids = [e["id"] for e in json.loads(request.read())["events"]]
        response = super().handle_request(request)
        if response.status_code == 202:
            with self._lock:
                self.accepted.update(ids)
        return response


def test_eight_threads_of_5000_events_are_counted_exactly(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    env = {**service_env, "METERLINE_TOPIC_PREFIX": topic_prefix}
    tenant = make_tenant(engine)
    transport = AcceptedIds()
    recorded: list[list[str]] = [[] for _ in range(THREADS)]
    with run_ingest(env, tmp_path / "ingest.log") as server:
        aggregator = AggregatorProcess(env, tmp_path / "aggregator.log").start()
        try:
            with MeterlineClient(
                server.url, tenant.key, transport=transport, flush_interval=0.1
            ) as client:

                def work(n: int) -> None:
                    # Thread n records quantity n + 1, so a lost or doubled event moves the sum.
                    for _ in range(EVENTS_PER_THREAD):
                        recorded[n].append(client.record("api_calls", quantity=n + 1))

                threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            expected_count = THREADS * EVENTS_PER_THREAD
            expected_sum = Decimal(EVENTS_PER_THREAD * sum(range(1, THREADS + 1)))
            wait_for(
                lambda: totals(engine, tenant.organization_id)[1] >= expected_count,
                timeout=120,
                what="every recorded event in usage_records",
            )
        finally:
            aggregator.stop()
    everything = [event_id for ids in recorded for event_id in ids]
    assert len(set(everything)) == expected_count
    assert transport.accepted == Counter(everything)  # each id accepted exactly once
    assert totals(engine, tenant.organization_id) == (expected_sum, expected_count)
