"""Wiring: settings, database engine, caches, Kafka publisher and routes; start and stop.

`create_app()` is what uvicorn runs in each worker (`meterline ingest serve`); tests pass their
own settings and, for in-process tests, an in-memory publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from services.ingest.api import authenticate_first, error_response, routes
from services.ingest.keycache import FreshCache, KeyCache, KeyUsageTally, ProjectCache
from services.ingest.keylookup import KeyLookups
from services.ingest.metercache import MeterCache
from services.ingest.publisher import EventPublisher, KafkaPublisher
from services.ingest.queries import IngestQueries
from services.ingest.ratelimit import RateLimiter
from services.ingest.service import IngestService
from shared import heap
from shared.db import create_async_db_engine
from shared.errors import MeterlineError
from shared.logs import configure_logging, log_event, register_secret
from shared.settings import Settings, get_settings

logger = logging.getLogger("meterline.ingest")

SWITCH_INTERVAL_SECONDS = 0.0005


def create_app(
    settings: Settings | None = None,
    *,
    publisher: EventPublisher | None = None,
    configure_logs: bool = True,
) -> ASGIApp:
    settings = settings or get_settings()
    pepper = settings.pepper_bytes()
    register_secret(pepper.decode())
    if configure_logs:
        configure_logging(settings.log_level, settings.log_format)
    # kafka-python narrates every connection at INFO; its warnings and errors are what matter.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = create_async_db_engine(settings, pool_size=5, max_overflow=5, pool_timeout=5)
        queries = IngestQueries(engine, pepper=pepper)
        background: list[asyncio.Task[None]] = []
        chosen = publisher
        if chosen is None:
            kafka = KafkaPublisher(settings)
            background.append(
                asyncio.create_task(kafka.connect([settings.events_topic, settings.dlq_topic]))
            )
            chosen = kafka
        tally = KeyUsageTally(queries.record_key_usage)
        lookups = KeyLookups(queries.find_keys)
        keys = KeyCache(
            lookups,
            pepper=pepper,
            ttl=settings.key_cache_ttl_seconds,
            changes=queries.key_changes,
            failures=RateLimiter(
                settings.ingest_auth_failures_per_second, settings.ingest_auth_failure_burst
            ),
        )
        meters = MeterCache(queries.meters, ttl=settings.key_cache_ttl_seconds)
        service = IngestService(
            settings,
            keys=keys,
            projects=ProjectCache(queries.projects, ttl=settings.key_cache_ttl_seconds),
            limiter=RateLimiter(
                settings.ingest_rate_limit_per_second, settings.ingest_rate_limit_burst
            ),
            tally=tally,
            publisher=chosen,
            meters=meters,
            usage=queries.usage,
            member_role=queries.member_role,
            customers=FreshCache(queries.customers, ttl=settings.key_cache_ttl_seconds),
            subscriptions=FreshCache(
                queries.subscription_customers, ttl=settings.key_cache_ttl_seconds
            ),
        )
        background.append(asyncio.create_task(tally.run(settings.key_usage_flush_seconds)))
        background.append(asyncio.create_task(keys.run_polls()))
        app.state.service = service
        app.state.queries = queries
        # A meter's value_property is its metric's value path in the drop-ins' payloads; a metric
        # without one keeps the drop-in's default (dropins/values.py).
        app.state.value_paths = meters.value_path
        # Everything built so far lives as long as the process: keep it out of the collector's
        # full passes, which otherwise rescan every module object and stall requests.
        heap.settle()
        # The producer's I/O thread needs the GIL to send and to settle acknowledgements; with
        # the default 5 ms switch interval a busy event loop (a flood of refused requests) hands
        # it over so rarely that every publish queues behind it.
        sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
        log_event(logger, "ingest_started", topic=settings.events_topic)
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await lookups.aclose()
            await service.aclose()
            await engine.dispose()
            log_event(logger, "ingest_stopped")

    async def unexpected(request: Request, exc: Exception) -> Response:
        log_event(
            logger, "request_failed", logging.ERROR, path=request.url.path, error=repr(exc)[:300]
        )
        return error_response(MeterlineError("internal error"))

    return authenticate_first(
        Starlette(routes=routes, lifespan=lifespan, exception_handlers={Exception: unexpected})
    )
