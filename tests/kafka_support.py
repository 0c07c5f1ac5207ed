"""Kafka and port helpers shared by the ingest and aggregator tests."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_topic(
    bootstrap: str,
    topic: str,
    *,
    timeout: float = 20.0,
    enough: Callable[[list[Any]], bool] | None = None,
) -> list[Any]:
    """Every record of `topic` from the beginning to its end offsets (kafka-python records);
    with `enough`, records that arrive later are read too until enough(records) or the timeout."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), enable_auto_commit=False)
    found: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        while time.monotonic() < deadline:
            end = consumer.end_offsets(tps)
            while time.monotonic() < deadline and any(
                consumer.position(tp) < end[tp] for tp in tps
            ):
                for batch in consumer.poll(timeout_ms=500).values():
                    found.extend(batch)
            if enough is None or enough(found):
                break
            time.sleep(0.2)
        return found
    finally:
        consumer.close()
