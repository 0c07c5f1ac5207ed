"""Open-loop load for bench_ingest: requests start on a fixed schedule whatever the responses do.

wrk is closed-loop (a connection sends its next request when the last one returns), which hides
queueing; here each request's latency runs from the instant it was *scheduled*, so a stall shows
up in the percentiles (no coordinated omission). Raw HTTP/1.1 on keep-alive connections: cheap.

    python openloop.py URL KEYS_FILE --rate 250 --duration 10 --batch 100 --connections 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit

EVENT = '{"id":"%s-%d-%d","metric":"api_calls","quantity":1,"properties":{"region":"eu"}}'


def build_request(host: str, key: str, run: str, number: int, batch: int) -> bytes:
    events = [EVENT % (run, number, i) for i in range(batch)]
    body = (events[0] if batch == 1 else '{"events":[' + ",".join(events) + "]}").encode()
    head = (
        f"POST /v1/events HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


async def worker(
    host: str,
    port: int,
    queue: asyncio.Queue[tuple[float, bytes] | None],
    latencies: list[float],
    statuses: dict[int, int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (item := await queue.get()) is not None:
            scheduled, request = item
            writer.write(request)
            try:
                status = await read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                statuses[-1] = statuses.get(-1, 0) + 1
                reader, writer = await asyncio.open_connection(host, port)
                continue
            latencies.append(time.perf_counter() - scheduled)
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def run(args: argparse.Namespace) -> dict[str, object]:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    keys = [line.strip() for line in open(args.keys_file) if line.strip()]  # noqa: ASYNC230, SIM115
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    workers = [
        asyncio.create_task(worker(host, port, queue, latencies, statuses))
        for _ in range(args.connections)
    ]
    total = int(args.rate * args.duration)
    interval = 1.0 / args.rate
    start = time.perf_counter()
    for number in range(total):
        scheduled = start + number * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        request = build_request(host, keys[number % len(keys)], args.run_id, number, args.batch)
        queue.put_nowait((scheduled, request))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - start
    latencies.sort()

    def percentile(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000

    return {
        "scheduled_rps": args.rate,
        "achieved_rps": len(latencies) / elapsed,
        "statuses": statuses,
        "p50_ms": percentile(50),
        "p90_ms": percentile(90),
        "p99_ms": percentile(99),
        "max_ms": latencies[-1] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("keys_file")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--run-id", default="openloop")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print("RESULT " + json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
