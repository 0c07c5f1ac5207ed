"""The OpenAPI document is true: schemathesis (every check) against the real running service,
with PostgreSQL and Kafka up, finds nothing; and the served document is the committed file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
from sqlalchemy.engine import Engine

from services.ingest.openapi import DOCUMENT_FILE
from shared.db import unit_of_work
from shared.meters import MeterDefinition, apply_meters
from tests.ingest_support import make_tenant, run_ingest

ROOT = Path(__file__).resolve().parents[2]
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
# Enough to reach every rule of every operation, small enough for about a minute on CI.
MAX_EXAMPLES = 100


def test_schemathesis_finds_no_failure_against_the_running_service(
    engine: Engine, service_env: dict[str, str], tmp_path: Path
) -> None:
    tenant = make_tenant(engine)
    # Usage queries by dimension reach their rules only when some meter keeps the dimension.
    meter = MeterDefinition("contract_tokens", "sum", ("model", "region", "tier"))
    with unit_of_work(engine) as session:
        apply_meters(session, [meter])
    with run_ingest(
        service_env,
        tmp_path / "ingest.log",
        # The contract is under test, not the rate limit (its 429 is documented and checked
        # by the ingest API tests).
        METERLINE_INGEST_RATE_LIMIT_PER_SECOND="1000000",
        METERLINE_INGEST_RATE_LIMIT_BURST="1000000",
    ) as server:
        served = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
        assert served == json.loads(DOCUMENT_FILE.read_text())
        run = subprocess.run(
            [
                str(SCHEMATHESIS),
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--header",
                f"Authorization: Bearer {tenant.key}",
                # NUL in text is refused (the document says so); JSON Schema cannot say it.
                "--generation-allow-x00",
                "false",
                "--no-color",
            ],
            env={
                **os.environ,
                "SCHEMATHESIS_HOOKS": "tests.contract_hooks",
                "METERLINE_CONTRACT_PROJECT_ID": str(tenant.project_id),
                "METERLINE_CONTRACT_METER": json.dumps(
                    {"metric": meter.metric, "dimensions": list(meter.dimensions)}
                ),
                "PYTHONPATH": str(ROOT),
            },
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
