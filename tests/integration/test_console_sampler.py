"""The real console's pipeline sampler: a process of its own that stores a reading every interval,
and stops when the console is gone, even when the console was killed without a chance to stop it."""

from __future__ import annotations

import os
import secrets
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tests.console_support import run_console


def _samples_since(engine: Engine, since: datetime) -> list[datetime]:
    with engine.connect() as connection:
        return list(
            connection.execute(
                sa.text(
                    "SELECT sampled_at FROM pipeline_samples WHERE sampled_at >= :since"
                    " ORDER BY sampled_at"
                ),
                {"since": since},
            ).scalars()
        )


def test_the_sampler_writes_while_the_console_runs_and_stops_when_it_is_killed(
    service_env: dict[str, str], engine: Engine, tmp_path: Path
) -> None:
    started = datetime.now(UTC)
    env = {
        **service_env,
        "METERLINE_TOPIC_PREFIX": f"sampler{secrets.token_hex(3)}",
        "METERLINE_CONSOLE_INGEST_URLS": "http://127.0.0.1:9",
        "METERLINE_CONSOLE_AGGREGATOR_URLS": "http://127.0.0.1:9",
        "METERLINE_CONSOLE_SAMPLE_SECONDS": "1",
    }
    with run_console(env, tmp_path / "console.log") as console:
        deadline = time.monotonic() + 30
        while len(_samples_since(engine, started)) < 2:
            assert time.monotonic() < deadline, console.logs()[-2000:]
            time.sleep(0.3)
        # Killed outright: no shutdown runs, so only the sampler's own check can stop it.
        os.kill(console.process.pid, signal.SIGKILL)
        console.process.wait(10)
        killed = datetime.now(UTC)
        time.sleep(8)  # the interval, one reading in flight (Kafka timeouts) and a margin
        late = [t for t in _samples_since(engine, killed) if t > killed + timedelta(seconds=4)]
        assert late == [], console.logs()[-2000:]


def test_the_console_stops_when_a_stop_signal_reaches_its_sampler_too(
    service_env: dict[str, str], engine: Engine, tmp_path: Path
) -> None:
    """A stop signal sent to the whole process group (as a service manager does) kills the
    sampler while it waits between readings; the console's own shutdown must still finish."""
    started = datetime.now(UTC)
    env = {
        **service_env,
        "METERLINE_TOPIC_PREFIX": f"sampler{secrets.token_hex(3)}",
        "METERLINE_CONSOLE_INGEST_URLS": "http://127.0.0.1:9",
        "METERLINE_CONSOLE_AGGREGATOR_URLS": "http://127.0.0.1:9",
        "METERLINE_CONSOLE_SAMPLE_SECONDS": "30",
    }
    with run_console(env, tmp_path / "console.log") as console:
        deadline = time.monotonic() + 30
        while not _samples_since(engine, started):
            assert time.monotonic() < deadline, console.logs()[-2000:]
            time.sleep(0.3)
        time.sleep(1)  # the reading is stored: the sampler now waits out its interval
        os.killpg(console.process.pid, signal.SIGTERM)
        # uvicorn ends by re-raising the signal it caught: -SIGTERM, after a full shutdown.
        assert console.process.wait(20) in (0, -signal.SIGTERM), console.logs()[-2000:]
        assert "console_stopped" in console.logs()
