"""The real local components, driven through the same deploy/local scripts as `make up`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CTL = ROOT / "deploy" / "local" / "ctl.sh"


def up() -> None:
    subprocess.run(["bash", str(ROOT / "deploy" / "local" / "up.sh")], check=True, cwd=ROOT)


def stop(component: str) -> None:
    """Stop 'postgres', 'kafka' or 'stripe-mock' and wait until it is really down."""
    subprocess.run(["bash", str(CTL), "stop", component], check=True, cwd=ROOT)


def start(component: str) -> None:
    """Start a component and wait until it answers."""
    subprocess.run(["bash", str(CTL), "start", component], check=True, cwd=ROOT)


def read_env_file(path: Path = ROOT / ".local" / "env") -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text().splitlines():
        line = raw.strip().removeprefix("export ").strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def local_env() -> dict[str, str]:
    """`.local/env` overlaid by the process environment (CI may point elsewhere)."""
    values = read_env_file()
    for key in list(values):
        if key in os.environ:
            values[key] = os.environ[key]
    return values
