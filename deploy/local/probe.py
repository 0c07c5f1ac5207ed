"""Whether a local component really answers: Kafka metadata, an HTTP request, a TCP connect.

Used by ctl.sh to wait for a start; standard library only, so it runs before the venv exists.
Exit status 0 when the component answers as required, 1 otherwise (the reason on stderr).
"""

from __future__ import annotations

import argparse
import base64
import socket
import struct
import sys
import urllib.error
import urllib.request

METADATA_API_KEY = 3
# Version 4 is old enough for every Kafka 1.0+ and still served by Kafka 4, which dropped 0 to 3.
METADATA_VERSION = 4


class NotReady(Exception):
    """The component is there but does not answer as required yet."""


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def probe_tcp(address: str, timeout: float) -> None:
    with socket.create_connection(split_address(address), timeout=timeout):
        pass


class Reader:
    """Reads big-endian Kafka protocol primitives from one response body."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return int(value)

    def string(self) -> str | None:
        length = self.take(">h")
        if length < 0:
            return None
        value = self.data[self.at : self.at + length].decode()
        self.at += length
        return value

    def int32_array(self) -> list[int]:
        return [self.take(">i") for _ in range(self.take(">i"))]


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise NotReady("broker closed the connection before answering")
        chunks += chunk
    return bytes(chunks)


def probe_kafka(address: str, timeout: float) -> None:
    """Ready means: a metadata answer that lists a broker, and a leader for every partition."""
    client_id = b"meterline-probe"
    correlation_id = 1
    request = struct.pack(
        ">hhih", METADATA_API_KEY, METADATA_VERSION, correlation_id, len(client_id)
    )
    request += client_id + struct.pack(">i?", -1, False)
    with socket.create_connection(split_address(address), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", receive_exactly(sock, 4))
        body = Reader(receive_exactly(sock, size))

    if body.take(">i") != correlation_id:
        raise NotReady("answer to another request")
    body.take(">i")  # throttle_time_ms
    brokers = []
    for _ in range(body.take(">i")):
        node_id = body.take(">i")
        host = body.string()
        port = body.take(">i")
        body.string()  # rack
        brokers.append(f"{node_id}@{host}:{port}")
    body.string()  # cluster_id
    body.take(">i")  # controller_id
    if not brokers:
        raise NotReady("metadata lists no broker yet")

    leaderless = []
    for _ in range(body.take(">i")):
        topic_error = body.take(">h")
        name = body.string()
        body.take(">?")  # is_internal
        if topic_error:
            leaderless.append(f"{name} (error {topic_error})")
        for _ in range(body.take(">i")):
            partition_error = body.take(">h")
            partition = body.take(">i")
            leader = body.take(">i")
            body.int32_array()  # replica_nodes
            body.int32_array()  # isr_nodes
            if leader < 0 or partition_error:
                leaderless.append(f"{name}-{partition}")
    if leaderless:
        shown = ", ".join(leaderless[:5])
        raise NotReady(f"{len(leaderless)} partitions without a leader yet: {shown}")


def probe_http(url: str, user: str | None, timeout: float) -> None:
    if not url.startswith(("http://", "https://")):
        raise NotReady(f"not an HTTP URL: {url}")
    request = urllib.request.Request(url)  # noqa: S310 (the scheme is checked above)
    if user is not None:
        credentials = base64.b64encode(f"{user}:".encode()).decode()
        request.add_header("Authorization", f"Basic {credentials}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    if status >= 500:
        raise NotReady(f"HTTP {status}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds for one attempt")
    sub = parser.add_subparsers(dest="kind", required=True)
    sub.add_parser("tcp", help="something accepts connections").add_argument("address")
    sub.add_parser("kafka", help="the broker answers metadata").add_argument("address")
    http = sub.add_parser("http", help="an HTTP server answers below 500")
    http.add_argument("url")
    http.add_argument("--user", help="basic-auth user name (Stripe keys go here)")
    args = parser.parse_args()
    try:
        if args.kind == "tcp":
            probe_tcp(args.address, args.timeout)
        elif args.kind == "kafka":
            probe_kafka(args.address, args.timeout)
        else:
            probe_http(args.url, args.user, args.timeout)
    except (OSError, NotReady, struct.error, UnicodeDecodeError) as error:
        print(f"{args.kind}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
