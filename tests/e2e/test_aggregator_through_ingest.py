"""Ingest -> Kafka -> aggregator -> usage_records with the real services: every 202 counted once,
nothing refused counted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
from sqlalchemy.engine import Engine

from tests.aggregator_support import AggregatorProcess, totals, wait_for
from tests.ingest_support import bearer, make_tenant, rfc3339, run_ingest


def test_retries_duplicates_late_events_and_refusals_count_exactly_the_accepted_events(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    env = {**service_env, "METERLINE_TOPIC_PREFIX": topic_prefix}
    tenants = [make_tenant(engine) for _ in range(3)]
    now = datetime.now(UTC)
    accepted: dict[object, dict[str, Decimal]] = {t.organization_id: {} for t in tenants}
    with run_ingest(env, tmp_path / "ingest.log") as server:
        aggregator = AggregatorProcess(env, tmp_path / "aggregator.log").start()
        try:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for t_index, tenant in enumerate(tenants):
                    for request in range(10):
                        events = [
                            {
                                "id": f"r{request}-e{i}",
                                "metric": "api_calls",
                                "quantity": str(Decimal(i % 4) / 2 + 1),
                                # every fifth event is late: it belongs to a window days ago
                                "timestamp": rfc3339(now - timedelta(days=i % 5 * 3, seconds=i)),
                            }
                            for i in range(50)
                        ]
                        key = tenant.scoped_key if request % 2 else tenant.key
                        for _attempt in range(2 if request % 3 == 0 else 1):  # client retries
                            response = client.post(
                                "/v1/events", json={"events": events}, headers=bearer(key)
                            )
                            assert response.status_code == 202, response.text
                        for e in events:
                            accepted[tenant.organization_id].setdefault(
                                e["id"], Decimal(e["quantity"])
                            )
                    # The same ids again in a later request (a redelivery from the client side).
                    repeat = [
                        {
                            "id": "r1-e1",
                            "metric": "api_calls",
                            "quantity": "1.5",
                            "timestamp": rfc3339(now - timedelta(days=3, seconds=1)),
                        }
                    ]
                    assert (
                        client.post(
                            "/v1/events", json={"events": repeat}, headers=bearer(tenant.key)
                        ).status_code
                        == 202
                    )
                    # A refused batch (one invalid event): nothing of it may be counted.
                    refused = [
                        {"id": f"bad-{t_index}", "metric": "api_calls"},
                        {"id": "worse", "metric": "Not A Metric"},
                    ]
                    assert (
                        client.post(
                            "/v1/events", json={"events": refused}, headers=bearer(tenant.key)
                        ).status_code
                        == 422
                    )

            def all_counted() -> bool:
                return all(
                    totals(engine, t.organization_id)[1] >= len(accepted[t.organization_id])
                    for t in tenants
                )

            wait_for(all_counted, timeout=90, what="every accepted event")
        finally:
            aggregator.stop()

    for tenant in tenants:
        expected = accepted[tenant.organization_id]
        assert totals(engine, tenant.organization_id) == (
            sum(expected.values(), Decimal(0)),
            len(expected),
        )
