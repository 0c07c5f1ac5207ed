"""`meterline demo` stopped by SIGTERM (a supervisor, `timeout`) stops every service it started, as
Ctrl-C does: none of ingest, the aggregator or the console is left running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STARTED = re.compile(r"started (\w+) \(pid (\d+),")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_at_the_console_step_stops_every_service_the_demo_started(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    signum = signal.SIGTERM  # SIGHUP takes the same path
    env = {**service_env, "PYTHONPATH": str(ROOT), "METERLINE_LOG_FORMAT": "text"}
    demo = subprocess.Popen(
        [sys.executable, "-m", "meterline", "demo", "--timeout", "90"],
        env=env,
        cwd=tmp_path,  # its logs go to .local/logs of the working directory
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert demo.stdout is not None
    services: dict[str, int] = {}
    output: list[str] = []
    deadline = time.monotonic() + 240
    try:
        for line in demo.stdout:
            output.append(line)
            if match := STARTED.search(line):
                services[match.group(1)] = int(match.group(2))
            if "Press Ctrl-C" in line or time.monotonic() > deadline:
                break
        assert "Press Ctrl-C" in "".join(output), "".join(output[-30:])
        assert set(services) == {"ingest", "aggregator", "console"}
        assert all(_alive(pid) for pid in services.values())

        demo.send_signal(signum)
        rest, _ = demo.communicate(timeout=90)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    output.append(rest)
    stopped_by = time.monotonic() + 10
    while any(_alive(pid) for pid in services.values()) and time.monotonic() < stopped_by:
        time.sleep(0.2)
    left = {name: pid for name, pid in services.items() if _alive(pid)}
    for pid in left.values():  # do not leave them to the next test either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after {signum.name}: {left}\n{''.join(output[-20:])}"
    for name in services:
        assert f"stopped {name}" in rest
