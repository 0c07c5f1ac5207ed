"""The real local components, driven through the same deploy/local scripts as `make up`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CTL = ROOT / "deploy" / "local" / "ctl.sh"


def up() -> None:
    subprocess.run(["bash", str(ROOT / "deploy" / "local" / "up.sh")], check=True, cwd=ROOT)


def ctl(*args: str, brokers: int | None = None) -> str:
    """Run ctl.sh; `brokers=3` addresses the three-node cluster (METERLINE_KAFKA_BROKERS)."""
    env = dict(os.environ)
    if brokers is not None:
        env["METERLINE_KAFKA_BROKERS"] = str(brokers)
    done = subprocess.run(
        ["bash", str(CTL), *args], check=True, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    return done.stdout


def stop(component: str, *, brokers: int | None = None) -> None:
    """Stop 'postgres', 'kafka' or 'stripe-mock' (or a cluster node, 'kafka-2') and wait until
    it is really down."""
    ctl("stop", component, brokers=brokers)


def start(component: str, *, brokers: int | None = None) -> None:
    """Start a component and wait until it answers."""
    ctl("start", component, brokers=brokers)


def kill(component: str, *, brokers: int | None = None) -> None:
    """SIGKILL a component ('kafka', or a cluster node such as 'kafka-2')."""
    ctl("kill", component, brokers=brokers)


def kafka_servers(kind: str = "plain", *, brokers: int | None = None) -> str:
    """Bootstrap servers of the single broker or (brokers=3) the cluster; kind 'sasl' for the
    SCRAM listeners."""
    return ctl("servers", kind, brokers=brokers).strip()


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
