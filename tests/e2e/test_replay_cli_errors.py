"""Bad `meterline replay` arguments and an unreachable broker: one clear line (or one JSON error
under --json) and a non-zero exit, never a traceback or a usage box."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.aggregator_support import create_topics
from tests.kafka_support import free_port

METERLINE = str(Path(sys.executable).parent / "meterline")
START = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
FROM = START.isoformat()
TO = (START + timedelta(hours=1)).isoformat()

BAD_ARGUMENTS = {
    "missing --to": ["--from", FROM],
    "--from after --to": ["--from", TO, "--to", FROM],
    "unparsable time": ["--from", "yesterday", "--to", TO],
    "out-of-range offset": ["--from", FROM, "--to", "9999-12-31T23:59:59-23:59"],
    "end of the calendar": ["--from", FROM, "--to", "9999-12-31T23:59:59Z"],
    "unknown organization": ["--from", FROM, "--to", TO, "--organization", str(uuid.uuid4())],
    "organization not an id": ["--from", FROM, "--to", TO, "--organization", "acme"],
}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [METERLINE, "replay", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def env(service_env: dict[str, str], topic_prefix: str) -> dict[str, str]:
    create_topics(
        service_env["KAFKA_BOOTSTRAP_SERVERS"],
        [f"{topic_prefix}.usage.events", f"{topic_prefix}.usage.events.dlq"],
        1,
    )
    return {**service_env, "METERLINE_TOPIC_PREFIX": topic_prefix}


def broker_down(env: dict[str, str]) -> dict[str, str]:
    return {**env, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}


def assert_one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "Usage:" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert done.stdout == ""
    return lines[0]


def assert_json_error(done: subprocess.CompletedProcess[str]) -> dict:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stdout == ""
    error = json.loads(done.stderr)["error"]
    assert error["code"] and error["message"]
    return error


@pytest.mark.parametrize("args", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_replay_arguments_exit_non_zero_with_one_line(
    env: dict[str, str], args: list[str]
) -> None:
    assert_one_line(run(env, *args))


@pytest.mark.parametrize("args", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_replay_arguments_under_json_print_a_json_error(
    env: dict[str, str], args: list[str]
) -> None:
    assert_json_error(run(env, *args, "--json"))


def test_out_of_range_offset_names_the_option(env: dict[str, str]) -> None:
    line = assert_one_line(run(env, *BAD_ARGUMENTS["out-of-range offset"]))

    assert "--to" in line and "out of range" in line


def test_replay_with_the_broker_down_is_one_line_and_a_json_error(env: dict[str, str]) -> None:
    down = broker_down(env)

    line = assert_one_line(run(down, "--from", FROM, "--to", TO))
    error = assert_json_error(run(down, "--from", FROM, "--to", TO, "--json"))

    assert "Kafka" in line
    assert error["code"] == "broker_unavailable"


def test_replay_dlq_with_the_broker_down_is_one_line_and_a_json_error(
    env: dict[str, str],
) -> None:
    down = broker_down(env)

    assert_one_line(run(down, "dlq"))
    assert assert_json_error(run(down, "dlq", "--json"))["code"] == "broker_unavailable"
