"""Pipeline health as the console shows it: ingest and aggregator /healthz, the aggregator's
counters (/metrics), consumer lag per partition and dead-letter counts; and the sampler that
stores one reading every few seconds (pipeline_samples), from which throughput and lag are charted.

A page reads the services live (a few milliseconds each) and Kafka's offsets from the latest
sample when it is fresh (at most three sampling intervals old), so no request waits on new Kafka
clients; without a fresh sample it reads Kafka itself.

Every probe has a short timeout and reports what failed instead of raising: a health page that
errors when the thing it watches is down shows nothing.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from services.aggregator.consumer_lag import PartitionLag
from services.aggregator.dead_letters import PartitionLetters
from services.console.live import PROBE_TIMEOUT_SECONDS, LiveReaders
from shared.db import unit_of_work
from shared.errors import MeterlineError
from shared.logs import log_event
from shared.models import PipelineSample
from shared.settings import Settings

logger = logging.getLogger("meterline.console")

#: Samples older than this are deleted by the sampler.
KEEP_SAMPLES = timedelta(days=7)
_COUNTER = re.compile(r"^meterline_aggregator_events_total\s+([0-9.e+]+)\s*$", re.MULTILINE)
_DLQ_COUNTER = re.compile(
    r'^meterline_aggregator_dlq_total\{code="([^"]+)"\}\s+([0-9.e+]+)\s*$', re.MULTILINE
)


@dataclass(frozen=True, slots=True)
class ServiceHealth:
    url: str
    status: str  # the service's own word ("ok", "stalled", ...), or "unreachable"
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True, slots=True)
class AggregatorHealth(ServiceHealth):
    events_total: int | None = None
    dead_letters_by_code: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PipelineHealth:
    checked_at: datetime
    ingest: list[ServiceHealth]
    aggregators: list[AggregatorHealth]
    consumer_group: str
    partitions: list[PartitionLag]
    lag_error: str | None
    dlq_retained: int | None
    dlq_pending: int | None
    dead_letter_error: str | None
    kafka_as_of: datetime  # when the offsets above were read

    @property
    def lag(self) -> int | None:
        return None if self.lag_error else sum(p.lag for p in self.partitions)

    @property
    def events_total(self) -> int | None:
        counts = [a.events_total for a in self.aggregators if a.events_total is not None]
        return sum(counts) if counts else None

    @property
    def last_batch_at(self) -> str | None:
        times = [
            str(a.detail["last_batch_at"])
            for a in self.aggregators
            if a.detail.get("last_batch_at")
        ]
        return max(times) if times else None


def _probe(client: httpx.Client, url: str) -> ServiceHealth:
    try:
        response = client.get(f"{url}/healthz")
        body = (
            response.json()
            if response.headers.get("content-type", "").startswith("application/json")
            else {}
        )
    except (httpx.HTTPError, ValueError) as exc:
        return ServiceHealth(url, "unreachable", {"error": str(exc)[:200] or type(exc).__name__})
    status = str(body.get("status", "ok" if response.status_code == 200 else response.status_code))
    return ServiceHealth(url, status, body if isinstance(body, dict) else {})


def _aggregator(client: httpx.Client, url: str) -> AggregatorHealth:
    health = _probe(client, url)
    events: int | None = None
    by_code: dict[str, int] = {}
    if health.status != "unreachable":
        try:
            text = client.get(f"{url}/metrics").text
            found = _COUNTER.search(text)
            events = int(float(found.group(1))) if found else None
            by_code = {m.group(1): int(float(m.group(2))) for m in _DLQ_COUNTER.finditer(text)}
        except httpx.HTTPError:
            pass
    return AggregatorHealth(health.url, health.status, health.detail, events, by_code)


def _kafka(
    live: LiveReaders,
) -> tuple[list[PartitionLag], str | None, list[PartitionLetters], str | None]:
    partitions: list[PartitionLag] = []
    lag_error = None
    try:
        partitions = live.lag.read()
    except MeterlineError as exc:
        lag_error = exc.message
    letters: list[PartitionLetters] = []
    letter_error = None
    try:
        letters = live.dead_letters.listing(limit=1).partitions
    except MeterlineError as exc:
        letter_error = exc.message
    return partitions, lag_error, letters, letter_error


def _services(
    settings: Settings, client: httpx.Client
) -> tuple[list[ServiceHealth], list[AggregatorHealth]]:
    ingest = [_probe(client, url) for url in settings.ingest_urls]
    aggregators = [_aggregator(client, url) for url in settings.aggregator_urls]
    return ingest, aggregators


def check_pipeline(settings: Settings, live: LiveReaders, *, now: datetime) -> PipelineHealth:
    """Everything read now: the services and Kafka (what the sampler stores)."""
    ingest, aggregators = _services(settings, live.http)
    partitions, lag_error, letters, letter_error = _kafka(live)
    return PipelineHealth(
        now, ingest, aggregators, live.consumer_group, partitions, lag_error,
        None if letter_error else sum(p.retained for p in letters),
        None if letter_error else sum(p.pending for p in letters),
        letter_error, now,
    )  # fmt: skip


def pipeline_health(
    settings: Settings,
    session: Session,
    live: LiveReaders,
    *,
    now: datetime,
    max_age: timedelta,
) -> PipelineHealth:
    """The services read now; Kafka's offsets from the latest sample younger than `max_age`,
    else read now."""
    sample = session.scalar(
        sa.select(PipelineSample)
        .where(PipelineSample.sampled_at >= now - max_age, PipelineSample.lag.is_not(None))
        .order_by(PipelineSample.sampled_at.desc())
        .limit(1)
    )
    if sample is None:
        return check_pipeline(settings, live, now=now)
    ingest, aggregators = _services(settings, live.http)
    partitions = [
        PartitionLag(int(p["partition"] or 0), p.get("committed"), int(p.get("end") or 0))
        for p in sample.partitions
    ]
    return PipelineHealth(
        now, ingest, aggregators, live.consumer_group, partitions, None, sample.dlq_messages,
        sample.dlq_pending, None if sample.dlq_messages is not None else "not read",
        sample.sampled_at,
    )  # fmt: skip


def record_sample(session: Session, health: PipelineHealth) -> None:
    session.add(
        PipelineSample(
            sampled_at=health.checked_at,
            events_total=health.events_total,
            lag=health.lag,
            partitions=[
                {"partition": p.partition, "committed": p.committed, "end": p.end}
                for p in health.partitions
            ],
            dlq_messages=health.dlq_retained,
            dlq_pending=health.dlq_pending,
        )
    )
    session.execute(
        sa.delete(PipelineSample).where(
            PipelineSample.sampled_at < health.checked_at - KEEP_SAMPLES
        )
    )


@dataclass(frozen=True, slots=True)
class ThroughputPoint:
    at: datetime
    events_per_second: float | None  # between the previous sample and this one
    lag: int | None
    dlq_messages: int | None


def throughput(samples: list[PipelineSample]) -> list[ThroughputPoint]:
    """Rates between consecutive samples (oldest first). A counter that went down was reset by a
    restart: the rate after it counts from zero."""
    points: list[ThroughputPoint] = []
    previous: PipelineSample | None = None
    for sample in samples:
        rate = None
        if (
            previous is not None
            and sample.events_total is not None
            and previous.events_total is not None
        ):
            seconds = (sample.sampled_at - previous.sampled_at).total_seconds()
            if seconds > 0:
                added = sample.events_total - previous.events_total
                rate = (added if added >= 0 else sample.events_total) / seconds
        points.append(ThroughputPoint(sample.sampled_at, rate, sample.lag, sample.dlq_messages))
        previous = sample
    return points


def recent_samples(session: Session, *, since: datetime) -> list[PipelineSample]:
    return list(
        session.scalars(
            sa.select(PipelineSample)
            .where(PipelineSample.sampled_at >= since)
            .order_by(PipelineSample.sampled_at)
        )
    )


class Sampler:
    """Reads the pipeline every `interval` seconds and stores the reading, in a process of its
    own: a reading builds Kafka clients and parses their replies (tens of milliseconds of Python
    each time), which in a thread of the console would hold the interpreter lock while pages
    wait for it.

    The process stops when asked, and on its own when the console that started it is gone. It is
    asked by closing a pipe, never by a multiprocessing.Event: setting an Event waits for its
    waiters to wake, so a sampler killed while waiting (a stop signal sent to the whole process
    group) would leave the console's shutdown waiting for ever."""

    def __init__(self, settings: Settings, interval: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._interval = interval
        self._stop_reader, self._stop_writer = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_sample_forever,
            args=(settings, interval, self._stop_reader, os.getpid()),
            name="pipeline-sampler",
            daemon=True,
        )

    def start(self) -> None:
        self._process.start()
        self._stop_reader.close()  # the sampler holds its own end

    def stop(self) -> None:
        self._stop_writer.close()  # the sampler's end reads end-of-file: stop
        self._process.join(timeout=self._interval + PROBE_TIMEOUT_SECONDS * 4)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)


def sample_once(
    settings: Settings, engine: Engine, live: LiveReaders, now: datetime
) -> PipelineHealth:
    """Read the pipeline now and store the reading."""
    health = check_pipeline(settings, live, now=now)
    with unit_of_work(engine) as session:
        record_sample(session, health)
    return health


def _sample_forever(settings: Settings, interval: float, stop: Any, parent: int) -> None:
    import signal
    from datetime import UTC

    from shared.db import create_sync_engine
    from shared.logs import configure_logging, register_secret

    # Ctrl-C reaches the whole process group: the console stops this process in its own time.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    register_secret(settings.pepper_bytes().decode())
    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    engine = create_sync_engine(settings, pool_size=1, max_overflow=0)
    live = LiveReaders(settings)
    try:
        while os.getppid() == parent:
            try:
                sample_once(settings, engine, live, datetime.now(UTC))
            except Exception as exc:  # the sampler must outlive a database or broker outage
                log_event(logger, "pipeline_sample_failed", logging.WARNING, error=str(exc)[:200])
            if stop.poll(interval):  # the console closed its end (or wrote): stop
                break
    finally:
        live.close()
        engine.dispose()
