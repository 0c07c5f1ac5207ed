"""Wiring of the aggregator: the Faust app, its one agent, the hourly ledger maintenance, /healthz
and /metrics. The batch loop here runs the numbered steps written down in service.py."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import faust
from faust.types import EventT
from faust.worker import Worker
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.aggregator import metrics
from services.aggregator.batch import DeadLetter, SourceRecord
from services.aggregator.consumer_lag import group_backlog
from services.aggregator.dlq_sink import DeadLetterSink, KafkaDeadLetterSink
from services.aggregator.ledger_partitions import maintain_ledger, prune_cutoff
from services.aggregator.refusals import is_transient
from services.aggregator.schemas import dead_letter_messages
from services.aggregator.service import BatchApplier, BatchResult
from shared import heap
from shared.db import create_sync_engine
from shared.errors import BrokerUnavailable, ConfigurationError
from shared.kafka import faust_broker_options
from shared.logs import log_event
from shared.settings import Settings
from shared.topics import ensure_topics, retention_shortfalls

logger = logging.getLogger("meterline.aggregator")

MAINTENANCE_SECONDS = 3600.0
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 10.0
SESSION_TIMEOUT_SECONDS = 60.0
# Allocations that start a young collection once the worker has started (shared/heap.py): about
# one per batch of the default size instead of hundreds.
BATCH_GC_THRESHOLD = 100_000
# After a stall is seen, /healthz answers 503 this long before the worker exits, so a probe sees
# why it is about to be restarted.
STALL_EXIT_DELAY_SECONDS = 3.0
# Exit status when a stop ran past METERLINE_AGGREGATOR_STOP_SECONDS and was cut short.
STOP_DEADLINE_EXIT_CODE = 3


class ConsumerStalled(Exception):
    """Lag and no batch for too long: the worker exits non-zero so its supervisor restarts it."""


def is_stalled(
    *, idle_seconds: float, lag: int, assigned: bool, busy: bool, stall_seconds: float
) -> bool:
    """No batch completed for `stall_seconds` while our partitions (or, with none assigned, the
    topic) hold unprocessed messages. A running batch is not a stall (a database outage retries
    inside it). With nothing assigned a rebalance may legitimately wait for a dead member's
    session to expire, so that case gets the session timeout on top."""
    if busy or lag <= 0:
        return False
    allowed = stall_seconds if assigned else stall_seconds + SESSION_TIMEOUT_SECONDS
    return idle_seconds >= allowed


def utc_now() -> datetime:
    return datetime.now(UTC)


class Backoff:
    """Doubling pauses between retries of one failing dependency, capped."""

    def __init__(self) -> None:
        self.delay = BACKOFF_FIRST_SECONDS

    async def pause(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, BACKOFF_MAX_SECONDS)


class Aggregator:
    """Runs batches to completion: a failing dependency is retried, never skipped or acked."""

    def __init__(
        self, app: faust.App, applier: BatchApplier, sink: DeadLetterSink, settings: Settings
    ) -> None:
        self.app = app
        self.applier = applier
        self.sink = sink
        self.settings = settings
        self.waiting_for: str | None = None
        self.last_batch_at: datetime | None = None
        self.started_at = utc_now()
        self.busy = False
        self.stalled_lag: int | None = None

    async def process(self, events: Sequence[EventT]) -> None:
        self.busy = True
        try:
            await self._process_shielded(events)
        finally:
            self.busy = False

    async def _process_shielded(self, events: Sequence[EventT]) -> None:
        work = asyncio.ensure_future(self._process(events))
        try:
            # Shielded: a shutdown in the middle lets the batch finish its commit and DLQ acks.
            await asyncio.shield(work)
        except asyncio.CancelledError:
            if not work.done():
                _never_commit(events)
                log_event(logger, "batch_abandoned_on_shutdown", logging.WARNING, n=len(events))
            raise
        except Exception as exc:
            # Not a dependency failure (those are retried inside): a bug or a refusal we do not
            # understand. Stop the worker rather than skip the batch; a restart redelivers it.
            _never_commit(events)
            log_event(logger, "batch_failed", logging.ERROR, error=repr(exc)[:500])
            await self.app.crash(exc)
            raise

    async def _process(self, events: Sequence[EventT]) -> None:
        started = time.perf_counter()
        records = [_source_record(event) for event in events]
        # (1) + (2): decode, then one database transaction; retried whole while the database is
        # unreachable, so nothing is acked (step 4) before it is committed.
        result = await self._apply_until_committed(records)
        # (3) dead letters are sent and acknowledged before the offsets may move.
        await self._send_dead_letters(result.dead_letters)
        # (4) returning lets `take` ack the events; Faust commits their offsets after this.
        self.last_batch_at = utc_now()
        metrics.EVENTS.inc(result.counted)
        metrics.DUPLICATES.inc(result.duplicates)
        metrics.CONFLICTS.inc(result.conflicts)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        self._observe_lag(events)
        log_event(
            logger,
            "batch_applied",
            logging.DEBUG,
            messages=len(records),
            counted=result.counted,
            duplicates=result.duplicates,
            conflicts=result.conflicts,
            dead_letters=len(result.dead_letters),
        )

    async def _apply_until_committed(self, records: list[SourceRecord]) -> BatchResult:
        backoff = Backoff()
        while True:
            try:
                result = await asyncio.to_thread(self.applier.apply, records)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                metrics.RETRIES.labels("database").inc()
                self.waiting_for = "database"
                log_event(
                    logger,
                    "batch_waiting_for_database",
                    logging.WARNING,
                    retry_in_seconds=backoff.delay,
                    error=str(getattr(exc, "orig", None) or exc).splitlines()[0][:200],
                )
                await backoff.pause()
                continue
            if self.waiting_for == "database":
                log_event(logger, "database_available_again")
            self.waiting_for = None
            return result

    async def _send_dead_letters(self, letters: list[DeadLetter]) -> None:
        if not letters:
            return
        messages = dead_letter_messages(letters, utc_now())
        backoff = Backoff()
        while True:
            try:
                await self.sink.send_all(messages)
                break
            except BrokerUnavailable as exc:
                # A letter sent twice is fine (the DLQ is at least once); one lost is not.
                metrics.RETRIES.labels("broker").inc()
                self.waiting_for = "broker"
                log_event(logger, "dlq_send_retry", logging.WARNING, error=exc.message[:200])
                await backoff.pause()
        self.waiting_for = None
        for code, count in Counter(letter.code for letter in letters).items():
            metrics.DLQ.labels(code).inc(count)
        for message in messages:
            log_event(
                logger,
                "dead_letter_sent",
                logging.WARNING,
                code=message.code,
                letters=message.letters,
                reason=message.reason[:300],
                partition=message.partition,
                offset=message.offset,
            )

    def _observe_lag(self, events: Sequence[EventT]) -> None:
        last: dict[Any, int] = {}
        for event in events:
            tp = event.message.tp
            last[tp] = max(last.get(tp, -1), event.message.offset)
        for tp, offset in last.items():
            try:
                highwater = self.app.consumer.highwater(tp)
            except Exception:  # noqa: S112  (lag is best effort: no highwater yet after a rebalance)
                continue
            if highwater is not None:
                metrics.CONSUMER_LAG.labels(str(tp.partition)).set(max(highwater - offset - 1, 0))

    async def maintain(self) -> None:
        """Create this and next month's ledger partitions; drop those no unprocessed event of
        the group can need (nothing when the backlog cannot be read)."""
        now = utc_now()
        cutoff = None
        try:
            backlog = await asyncio.to_thread(
                group_backlog,
                self.settings,
                app_id(self.settings),
                self.settings.events_topic,
            )
            cutoff = prune_cutoff(now, self.settings, backlog.oldest_received_at)
        except Exception as exc:
            log_event(logger, "ledger_backlog_unknown", logging.WARNING, error=str(exc)[:200])
        try:
            created, dropped = await asyncio.to_thread(
                maintain_ledger, self.applier.engine, now, cutoff=cutoff
            )
        except Exception as exc:
            log_event(logger, "ledger_maintenance_failed", logging.WARNING, error=str(exc)[:200])
            return
        log_event(
            logger,
            "ledger_maintained",
            created=created,
            dropped=dropped,
            cutoff=cutoff.isoformat() if cutoff else None,
        )

    def _assigned(self) -> set[int]:
        return {
            tp.partition
            for tp in (self.app.consumer.assignment() if self.app.consumer else ())
            if tp.topic == self.settings.events_topic
        }

    def _our_lag(self) -> tuple[int, bool]:
        """Unprocessed messages on our partitions (all of the topic's when none is assigned)."""
        backlog = group_backlog(
            self.settings,
            app_id(self.settings),
            self.settings.events_topic,
            with_age=False,
        )
        assigned = self._assigned()
        if not assigned:
            return backlog.messages, False
        return sum(n for p, n in backlog.by_partition.items() if p in assigned), True

    async def watch(self) -> None:
        """The stall watchdog: Faust was seen to stop consuming after its group session expired
        in a long broker outage, with nothing to notice. Exiting lets a supervisor restart it."""
        if self.stalled_lag is not None:
            return
        stall = self.settings.aggregator_stall_seconds
        idle = (utc_now() - (self.last_batch_at or self.started_at)).total_seconds()
        if self.busy or idle < stall:
            return
        try:
            lag, assigned = await asyncio.to_thread(self._our_lag)
        except Exception as exc:  # broker unreachable: Faust reconnects, and we cannot tell
            log_event(logger, "stall_check_failed", logging.WARNING, error=str(exc)[:200])
            return
        idle = (utc_now() - (self.last_batch_at or self.started_at)).total_seconds()
        if not is_stalled(
            idle_seconds=idle, lag=lag, assigned=assigned, busy=self.busy, stall_seconds=stall
        ):
            log_event(logger, "stall_check_passed", logging.DEBUG, lag=lag, idle_seconds=idle)
            return
        self.stalled_lag = lag
        log_event(
            logger,
            "consumer_stalled",
            logging.ERROR,
            lag=lag,
            idle_seconds=round(idle),
            assigned_partitions=sorted(self._assigned()),
        )
        await asyncio.sleep(STALL_EXIT_DELAY_SECONDS)
        await self.app.crash(
            ConsumerStalled(f"no batch for {idle:.0f}s with {lag} messages unprocessed")
        )

    def healthy(self) -> bool:
        return self.stalled_lag is None

    def health(self) -> dict[str, Any]:
        if self.stalled_lag is not None:
            status = "stalled"
        else:
            status = "ok" if self.waiting_for is None else f"waiting_for_{self.waiting_for}"
        return {
            "status": status,
            "lag": self.stalled_lag,
            "last_batch_at": self.last_batch_at.isoformat() if self.last_batch_at else None,
            "assigned_partitions": sorted(self._assigned()),
        }


class AggregatorWorker(Worker):
    """faust's worker with a bound on stopping. Once a stop begins (SIGTERM, SIGINT, a crash)
    the process exits within `stop_seconds`: whatever is still running then (a batch waiting
    for the database, the producer draining, a lag read) is cut off as a SIGKILL would, which
    the design already makes safe: its offsets were not committed, so it is redelivered, and the
    ledger counts it once."""

    def __init__(self, app: faust.App, *, stop_seconds: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._stop_seconds = stop_seconds
        self._deadline: threading.Timer | None = None

    async def stop(self) -> None:
        if self._deadline is None:
            self._deadline = threading.Timer(
                self._stop_seconds, _exit_at_deadline, (self._stop_seconds,)
            )
            self._deadline.daemon = True
            self._deadline.start()
            log_event(logger, "aggregator_stopping", deadline_seconds=self._stop_seconds)
        await super().stop()


def _exit_at_deadline(seconds: float) -> None:
    log_event(logger, "aggregator_stop_deadline_exceeded", logging.WARNING, seconds=seconds)
    logging.shutdown()
    os._exit(STOP_DEADLINE_EXIT_CODE)


def ensure_web_port_free(settings: Settings) -> None:
    """Refuse to start while another process holds the web port: with the default static id
    (<host>-<port>) a second instance on one port would take the first one's group membership."""
    port = settings.aggregator_web_port
    if port == 0:
        return
    with socket.socket() as probe:
        # As the web server binds: a closed connection of a killed instance (TIME_WAIT) does not
        # hold the port, a listening socket does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.aggregator_web_host, port))
        except OSError as exc:
            raise ConfigurationError(
                f"METERLINE_AGGREGATOR_PORT {port} on {settings.aggregator_web_host} is in use "
                f"({exc.strerror}): another aggregator on this host needs its own port"
            ) from None


def _never_commit(events: Sequence[EventT]) -> None:
    """Faust acks the events of a `take` even when the loop body raised or was cancelled. Marking
    their messages acked first turns that ack into a no-op: their offsets are never committed, and
    the batch is delivered again after a restart (the ledger makes that harmless)."""
    for event in events:
        event.message.acked = True


def _source_record(event: EventT) -> SourceRecord:
    message = event.message
    timestamp = message.timestamp
    return SourceRecord(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        timestamp_ms=int(timestamp * 1000) if timestamp else None,
        key=message.key,
        value=message.value or b"",
    )


def wait_for_topics(settings: Settings) -> None:
    """Create the events and DLQ topics if absent, waiting for the broker: Faust does not declare
    a source topic, and a group that starts before its topic exists is assigned nothing."""
    backoff = BACKOFF_FIRST_SECONDS
    while True:
        try:
            created = ensure_topics(settings)
        except Exception as exc:
            log_event(logger, "broker_unavailable", logging.WARNING, error=str(exc)[:200])
            time.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)
            continue
        if created:
            log_event(logger, "topics_created", topics=created)
        break
    try:
        shortfalls = retention_shortfalls(settings, [settings.events_topic, settings.dlq_topic])
    except Exception as exc:
        log_event(logger, "topic_retention_unknown", logging.WARNING, error=str(exc)[:200])
        return
    for message in shortfalls:
        log_event(logger, "topic_retention_short", logging.WARNING, problem=message)


def group_instance_id(settings: Settings) -> str | None:
    """This instance's static group membership id, or None for a dynamic member."""
    chosen = settings.aggregator_instance_id
    if chosen == "none":
        return None
    if chosen == "auto":
        port = settings.aggregator_web_port
        # Port 0 is any port: two instances of one host could not be told apart, and a restart
        # would not find its old id; such an instance joins as a dynamic member.
        return f"{socket.gethostname()}-{port}" if port else None
    return chosen


def app_id(settings: Settings) -> str:
    """The consumer group: every instance with this id shares the topic's partitions."""
    return f"{settings.topic_prefix}-aggregator"


def create_app(settings: Settings) -> tuple[faust.App, Aggregator]:
    # Faust keeps no state of ours here (no tables), but it insists on a data directory.
    datadir = Path(tempfile.gettempdir()) / "meterline-faust" / app_id(settings)
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id(settings),
        **faust_broker_options(settings),
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        topic_partitions=settings.topic_partitions,
        producer_acks=-1,
        broker_commit_interval=1.0,
        # A killed instance's partitions move to the others after this long. Not shorter: a
        # broker restart slower than this expires the session, and the rejoin after it was seen
        # to leave the consumer idle (tests/faults: broker restart with 10 s and 30 s). A
        # restarted instance does not wait for it: with its static id it takes its old
        # member's place (and partitions) when it joins.
        broker_session_timeout=SESSION_TIMEOUT_SECONDS,
        broker_heartbeat_interval=3.0,
        consumer_group_instance_id=group_instance_id(settings),
        # The topics faust creates for itself (its assignor's leader topic) as ours are.
        topic_replication_factor=settings.topic_replication_factor or 1,
        web_enabled=True,
        web_bind=settings.aggregator_web_host,
        web_host=settings.aggregator_web_host,
        web_port=settings.aggregator_web_port,
        datadir=datadir,
    )
    events_topic = app.topic(
        settings.events_topic,
        key_type=bytes,
        value_type=bytes,
        partitions=settings.topic_partitions,
    )
    engine = create_sync_engine(settings, pool_size=2, max_overflow=2)
    sink = KafkaDeadLetterSink(settings)
    aggregator = Aggregator(app, BatchApplier(engine, settings), sink, settings)

    async def close_dead_letter_sink(sender: Any, **kwargs: Any) -> None:
        await sink.close(wait_seconds=2.0)

    # After the consumer stopped: no batch sends letters any more.
    app.on_before_shutdown.connect(cast(Any, close_dead_letter_sink))

    @app.agent(events_topic, name="aggregate")
    async def aggregate(stream: faust.StreamT[bytes]) -> None:
        assert isinstance(stream, faust.Stream)
        async for events in stream.take_events(
            settings.aggregator_batch_messages, within=settings.aggregator_batch_seconds
        ):
            await aggregator.process(events)

    @app.timer(interval=MAINTENANCE_SECONDS)
    async def maintain_ledger_hourly() -> None:
        await aggregator.maintain()

    @app.task
    async def maintain_ledger_at_start() -> None:
        await aggregator.maintain()

    @app.task
    async def settle_heap_at_start() -> None:
        heap.settle(young_threshold=BATCH_GC_THRESHOLD)

    @app.timer(interval=max(1.0, settings.aggregator_stall_seconds / 4))
    async def watch_for_stall() -> None:
        await aggregator.watch()

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json(aggregator.health(), status=200 if aggregator.healthy() else 503)

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        # aiohttp refuses a charset inside content_type; the exposition format is UTF-8 text.
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    return app, aggregator
