"""`meterline billing serve` (the real process, which also runs the scheduler) refuses a webhook
body over 1 MiB with 413 before reading it: its peak memory does not grow with the body."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.kafka_support import free_port

METERLINE = str(Path(sys.executable).parent / "meterline")
BODY_BYTES = 96 * 1024 * 1024
CHUNK = b"x" * (64 * 1024)
# The bound (1 MiB) plus the server's read buffers: far below the 96 MiB a full read would take.
PEAK_GROWTH_LIMIT = 16 * 1024 * 1024


@dataclass
class BillingServer:
    port: int
    process: subprocess.Popen[bytes]

    def peak_rss(self) -> int:
        """VmHWM: the most resident memory the process ever had, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")


@pytest.fixture
def server(service_env: dict[str, str], tmp_path: Path) -> Iterator[BillingServer]:
    port = free_port()
    env = {**service_env, "METERLINE_BILLING_PORT": str(port)}
    with (tmp_path / "billing.log").open("wb") as log:
        process = subprocess.Popen(
            [METERLINE, "billing", "serve", "--interval", "86400"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = BillingServer(port, process)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "billing.log").read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "billing serve did not start"
            time.sleep(0.2)
        yield running
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def post_huge(port: int, *, chunked: bool) -> int:
    """POST a 96 MiB unsigned body (declared, or chunked without a length) while reading the
    answer; returns its status. The body is sent from a thread until the server stops reading."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=60)
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {BODY_BYTES}"
    connection.sendall(
        (
            "POST /v1/stripe/webhook HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Type: application/json\r\nStripe-Signature: t=1,v1=00\r\n{length}\r\n\r\n"
        ).encode()
    )

    def send_body() -> None:
        piece = f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n" if chunked else CHUNK
        try:
            for _ in range(BODY_BYTES // len(CHUNK)):
                connection.sendall(piece)
            if chunked:
                connection.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: the rest is not wanted

    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    try:
        head = b""
        while b"\r\n" not in head:
            data = connection.recv(4096)
            if not data:
                break
            head += data
    finally:
        connection.close()
        sender.join(60)
    return int(head.split(b" ", 2)[1])


@pytest.mark.parametrize("chunked", [False, True], ids=["declared-length", "chunked"])
def test_webhook_body_over_one_mebibyte_is_413_before_it_is_read(
    server: BillingServer, chunked: bool
) -> None:
    before = server.peak_rss()

    status = post_huge(server.port, chunked=chunked)

    grown = server.peak_rss() - before
    assert status == 413
    assert grown < PEAK_GROWTH_LIMIT, f"peak RSS grew by {grown / 2**20:.1f} MiB"
    # Still serving (the scheduler shares the process).
    assert httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5).status_code == 200
    assert server.process.poll() is None
