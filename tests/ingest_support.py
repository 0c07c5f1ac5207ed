"""Helpers of the ingest and client tests: run the real service, make tenants, read the topic."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
from sqlalchemy.engine import Engine

from shared.db import unit_of_work
from shared.events import Envelope, decode_envelope
from tests import factories, kafka_support
from tests.kafka_support import free_port

ROOT = Path(__file__).resolve().parent.parent
METERLINE_BIN = ROOT / ".venv" / "bin" / "meterline"


@dataclass
class IngestServer:
    url: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def run_ingest(
    env: dict[str, str],
    log_path: Path,
    *,
    workers: int = 1,
    ready_path: str = "/readyz",
    **overrides: str,
) -> Iterator[IngestServer]:
    """`meterline ingest serve` on a free port, answering 200 on `ready_path` before it yields
    (/readyz: database and broker reachable)."""
    port = free_port()
    # Keys are made by tests.factories with its pepper: the service must hash with the same one
    # (service_env keeps the pepper of .local/env when that file has one).
    full_env = {**env, "METERLINE_API_KEY_PEPPER": factories.PEPPER.decode(), **overrides}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(METERLINE_BIN), "ingest", "serve", "--port", str(port), "--workers", str(workers)],
            env=full_env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = IngestServer(f"http://127.0.0.1:{port}", log_path, process)
    try:
        wait_ready(server, ready_path)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


def wait_ready(server: IngestServer, path: str = "/readyz", timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"ingest exited early:\n{server.logs()[-3000:]}")
        try:
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"ingest not ready after {timeout}s:\n{server.logs()[-3000:]}")


@dataclass(frozen=True)
class Tenant:
    organization_id: uuid.UUID
    project_id: uuid.UUID
    key_id: uuid.UUID
    key: str
    scoped_key_id: uuid.UUID
    scoped_key: str


def make_tenant(engine: Engine) -> Tenant:
    """An organization with one project, an organization-wide key and a key scoped to the
    project, committed so that the service process sees them."""
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session)
        project = factories.make_project(session, organization)
        key = factories.make_api_key(session, organization)
        scoped = factories.make_api_key(session, organization, project=project)
        return Tenant(
            organization.id, project.id, key.key.id, key.plaintext, scoped.key.id, scoped.plaintext
        )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def event(event_id: str | None = None, **fields: object) -> dict[str, object]:
    return {"id": event_id or f"ev-{uuid.uuid4()}", "metric": "api_calls", **fields}


@dataclass(frozen=True)
class TopicRecord:
    key: bytes
    raw_value: bytes
    timestamp_ms: int

    @property
    def envelope(self) -> Envelope:
        return decode_envelope(self.raw_value)


def read_topic(
    bootstrap: str,
    topic: str,
    organization_id: uuid.UUID,
    *,
    expect: int,
    timeout: float = 20.0,
) -> list[TopicRecord]:
    """Every record of `organization_id` on the topic, once at least `expect` are there."""
    wanted = str(organization_id).encode()

    def ours(records: list) -> list[TopicRecord]:
        return [TopicRecord(r.key, r.value, r.timestamp) for r in records if r.key == wanted]

    return ours(
        kafka_support.read_topic(
            bootstrap, topic, timeout=timeout, enough=lambda found: len(ours(found)) >= expect
        )
    )


def rfc3339(instant: datetime) -> str:
    return instant.isoformat().replace("+00:00", "Z")


def event_ids_on_topic(
    bootstrap: str,
    topic: str,
    organization_id: uuid.UUID,
    *,
    expect: int,
    timeout: float = 20.0,
) -> list[str]:
    """The ids of every event of `organization_id` on the topic, in topic order, once at least
    `expect` events are there (or the timeout passed)."""
    wanted = str(organization_id).encode()

    def ids(records: list) -> list[str]:
        return [
            event.id
            for record in records
            if record.key == wanted
            for event in decode_envelope(record.value).events
        ]

    return ids(
        kafka_support.read_topic(
            bootstrap, topic, timeout=timeout, enough=lambda found: len(ids(found)) >= expect
        )
    )
