"""What the command line promises an operator's scripts: exit statuses (0 done, 1 failed, 2 usage
error, 3 needs a person), JSON errors under --json even for usage errors, a version, settings
refused by name at start and read from the env file like the environment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Engine

from shared.db import unit_of_work
from tests import factories
from tests.kafka_support import free_port

ROOT = Path(__file__).resolve().parents[2]


def meterline(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meterline", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("billing", "run", "--bogus", "--json"), "No such option: --bogus"),
        (("keys", "create", "--json"), "Missing option '--org'"),
        (("replay", "--from", "x", "--json", "--nope"), "No such option: --nope"),
    ],
)
def test_a_usage_error_under_json_is_one_json_document_and_status_2(
    service_env: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    result = meterline(service_env, *args)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    error = json.loads(line)["error"]
    assert error["code"] == "usage" and message in error["message"]
    assert error["details"]["command"].startswith("meterline")


def test_a_usage_error_without_json_is_the_usage_text_and_status_2(
    service_env: dict[str, str],
) -> None:
    result = meterline(service_env, "billing", "run", "--bogus")
    assert result.returncode == 2
    assert "Usage: meterline billing run" in result.stderr
    assert "No such option: --bogus" in result.stderr
    assert "Traceback" not in result.stderr


def test_version_names_the_server_and_the_client(service_env: dict[str, str]) -> None:
    from importlib.metadata import version

    result = meterline(service_env, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == (
        f"meterline {version('meterline')} (client {version('meterline-client')})"
    )


@pytest.mark.parametrize(
    ("variable", "value", "args"),
    [
        ("METERLINE_LOG_LEVEL", "verbose", ("aggregate", "run")),
        ("METERLINE_LOG_LEVEL", "verbose", ("ingest", "serve")),
        ("METERLINE_LOG_FORMAT", "xml", ("ingest", "serve")),
        ("METERLINE_LOG_FORMAT", "xml", ("billing", "serve")),
    ],
)
def test_a_bad_log_setting_stops_the_service_at_start_naming_it(
    service_env: dict[str, str], variable: str, value: str, args: tuple[str, ...]
) -> None:
    result = meterline({**service_env, variable: value}, *args, timeout=60)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert variable in line and value in line, line


def test_a_bad_log_level_option_is_refused_by_name(service_env: dict[str, str]) -> None:
    result = meterline(service_env, "aggregate", "run", "--log-level", "verbose", timeout=60)
    assert result.returncode == 1
    assert "verbose" in result.stderr and "Traceback" not in result.stderr


def test_billing_run_with_unresolved_mismatches_exits_3(
    service_env: dict[str, str], engine: Engine
) -> None:
    """stripe-mock answers every subscription lookup with its own canned price and period, so
    reconciliation records price_differs, which needs a person: the run worked, status 3."""
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session)
        plan = factories.make_plan(session, price_monthly=4900, price_yearly=49000)
        factories.make_subscription(session, organization, plan)
        organization_id = organization.id
    result = meterline(
        service_env,
        "billing",
        "run",
        "--organization",
        str(organization_id),
        "--as-of",
        datetime.now(UTC).isoformat(),
        "--json",
    )
    document = json.loads(result.stdout)
    assert [m for m in document["mismatches"] if not m["resolved"]], document["mismatches"]
    assert result.returncode == 3, result.stderr


def test_ingest_serve_reads_host_port_and_workers_from_the_env_file(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    settings = {
        key: value
        for key, value in service_env.items()
        if key in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "METERLINE_TOPIC_PREFIX")
    }
    settings |= {
        "METERLINE_API_KEY_PEPPER": factories.PEPPER.decode(),
        "METERLINE_INGEST_HOST": "127.0.0.1",
        "METERLINE_INGEST_PORT": str(port),
        "METERLINE_INGEST_WORKERS": "1",
    }
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"export {k}='{v}'\n" for k, v in settings.items()))
    # Only the file says where to listen: the process environment has none of these.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "METERLINE_ENV_FILE": str(env_file)}
    with (tmp_path / "ingest.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "meterline", "ingest", "serve"],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail((tmp_path / "ingest.log").read_text()[-2000:])
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(20)
