"""The whole path through the broker's SASL_PLAINTEXT listener with SCRAM-SHA-512, as against a
cluster with authentication: ingest publishes, the aggregator counts and dead-letters, and replay
rebuilds a window, each logging in with the KAFKA_SASL_* settings alone."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tests.aggregator_support import AggregatorProcess, dead_letters, totals, wait_for, windows
from tests.ingest_support import bearer, make_tenant, rfc3339, run_ingest

METERLINE = str(Path(sys.executable).parent / "meterline")


def scram_env(
    service_env: dict[str, str], local_env: dict[str, str], prefix: str
) -> dict[str, str]:
    return {
        **service_env,
        "METERLINE_TOPIC_PREFIX": prefix,
        "KAFKA_BOOTSTRAP_SERVERS": local_env["METERLINE_LOCAL_KAFKA_SCRAM_SERVERS"],
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": local_env["METERLINE_LOCAL_KAFKA_SCRAM_USERNAME"],
        "KAFKA_SASL_PASSWORD": local_env["METERLINE_LOCAL_KAFKA_SCRAM_PASSWORD"],
    }


def test_ingest_aggregator_and_replay_work_through_the_scram_listener(
    engine: Engine,
    service_env: dict[str, str],
    local_env: dict[str, str],
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    env = scram_env(service_env, local_env, topic_prefix)
    tenant = make_tenant(engine)
    org = tenant.organization_id
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    timed = [
        {"id": f"t{i}", "metric": "api_calls", "quantity": 2, "timestamp": rfc3339(hour)}
        for i in range(20)
    ]
    untimed = [{"id": f"u{i}", "metric": "api_calls"} for i in range(20)]
    with run_ingest(env, tmp_path / "ingest.log") as server:
        aggregator = AggregatorProcess(env, tmp_path / "aggregator.log").start()
        try:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for body in (timed, untimed, untimed, timed[:5]):  # with resends
                    response = client.post(
                        "/v1/events", json={"events": body}, headers=bearer(tenant.key)
                    )
                    assert response.status_code == 202, response.text
                conflict = [{**timed[0], "quantity": 9}]
                assert (
                    client.post(
                        "/v1/events", json={"events": conflict}, headers=bearer(tenant.key)
                    ).status_code
                    == 202
                )
            wait_for(lambda: totals(engine, org) == (Decimal(60), 40), timeout=90, what="counts")
            dlq = f"{topic_prefix}.usage.events.dlq"
            wait_for(
                lambda: len(dead_letters(service_env["KAFKA_BOOTSTRAP_SERVERS"], dlq)) >= 1,
                timeout=30,
                what="the dead letter",
            )
        finally:
            aggregator.stop()

    good = windows(engine, org)
    with engine.begin() as connection:
        connection.execute(
            sa.text("DELETE FROM usage_records WHERE organization_id = :org AND window_start = :w"),
            {"org": org, "w": hour},
        )
    done = subprocess.run(
        [METERLINE, "replay", "--from", hour.isoformat(), "--to",
         (hour + timedelta(hours=1)).isoformat(), "--organization", str(org), "--json"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["events_counted"] == 20
    assert windows(engine, org) == good
    assert totals(engine, org) == (Decimal(60), 40)
    (letter,) = dead_letters(service_env["KAFKA_BOOTSTRAP_SERVERS"], dlq)
    assert letter["code"] == "conflicting_duplicate"
