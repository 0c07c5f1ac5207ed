"""Helpers of the console tests: operators, a logged-in client, dead letters on a topic, and the
real console as a process."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
from sqlalchemy.engine import Engine

from services.aggregator.batch import DeadLetter, SourceRecord
from services.aggregator.schemas import dead_letter_messages
from shared.db import unit_of_work
from shared.kafka import create_producer
from shared.models import OperatorRole
from shared.operators import create_operator
from shared.settings import load_settings
from tests import factories
from tests.kafka_support import free_port

ROOT = Path(__file__).resolve().parent.parent
METERLINE_BIN = ROOT / ".venv" / "bin" / "meterline"


@dataclass(frozen=True)
class OperatorToken:
    id: uuid.UUID
    name: str
    token: str


def make_operator(engine: Engine, role: OperatorRole) -> OperatorToken:
    """An operator, committed, with its plaintext token (hashed with the tests' pepper)."""
    with unit_of_work(engine) as session:
        created = create_operator(
            session,
            name=f"{role}-{secrets.token_hex(3)}",
            role=role,
            pepper=factories.PEPPER,
        )
        return OperatorToken(created.operator.id, created.operator.name, created.plaintext)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_LOGIN_CSRF = re.compile(r'name="login_csrf" value="([^"]+)"')


def login(client: httpx.Client, token: str) -> str:
    """Log `client` in through the login form; returns the session's CSRF token (read from a
    page, as a browser would)."""
    form = client.get("/login")
    match = _LOGIN_CSRF.search(form.text)
    assert match, form.text
    response = client.post(
        "/login", data={"token": token, "login_csrf": match.group(1), "next": "/"}
    )
    assert response.status_code == 303, response.text
    page = client.get("/")
    found = _CSRF.search(page.text)
    assert found, page.text
    return found.group(1)


def produce_dead_letter(
    bootstrap: str,
    dlq_topic: str,
    payload: bytes,
    *,
    organization_id: uuid.UUID,
    code: str = "unknown_reference",
    retryable: bool = True,
    reason: str = "unknown organization",
) -> tuple[int, int]:
    """One dead letter of a whole record on the DLQ topic as the aggregator writes it (through
    dead_letter_messages); returns (partition, offset)."""
    letter = DeadLetter(
        source=SourceRecord("events", 0, 0, None, str(organization_id).encode(), payload),
        code=code,
        reason=reason,
        retryable=retryable,
        raw=payload,
    )
    [message] = dead_letter_messages([letter], datetime.now(UTC))
    producer = create_producer(
        load_settings(kafka_bootstrap_servers=bootstrap), client_id="tests-dead-letters", acks="all"
    )
    try:
        sent = producer.send(
            dlq_topic, key=message.key, value=message.value, headers=message.headers
        ).get(timeout=30)
    finally:
        producer.close(timeout=10)
    return sent.partition, sent.offset


@dataclass
class ConsoleServer:
    url: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def run_console(env: dict[str, str], log_path: Path, **overrides: str) -> Iterator[ConsoleServer]:
    """`meterline console` on a free port, answering /login before it yields."""
    port = free_port()
    full_env = {**env, "METERLINE_API_KEY_PEPPER": factories.PEPPER.decode(), **overrides}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(METERLINE_BIN), "console", "--port", str(port)],
            env=full_env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = ConsoleServer(f"http://127.0.0.1:{port}", log_path, process)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"console exited early:\n{server.logs()[-3000:]}")
            try:
                if httpx.get(server.url + "/login", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"console not ready:\n{server.logs()[-3000:]}")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
