"""`meterline billing serve`: the Stripe webhook endpoint and the billing scheduler, wired."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from services.billing.api import webhook_endpoint
from services.billing.runner import run_once
from shared.db import create_sync_engine
from shared.errors import Conflict, MeterlineError
from shared.logs import log_event
from shared.settings import Settings

logger = logging.getLogger("meterline.billing.scheduler")


async def schedule_billing(settings: Settings, engine: Engine) -> None:
    """Run billing every interval; a run still going elsewhere (the lock) is skipped, not queued."""
    while True:
        try:
            result = await asyncio.to_thread(
                run_once,
                engine,
                settings,
                as_of=datetime.now(UTC),
                use_stripe=True,
                list_invoices=False,
            )
            log_event(
                logger,
                "billing_scheduled_run",
                invoices_changed=len(result.invoices),
                reported=len(result.reported),
                mismatches=len(result.mismatches),
            )
        except Conflict:
            log_event(logger, "billing_run_skipped", reason="another run holds the lock")
        except MeterlineError as exc:
            log_event(logger, "billing_run_failed", level=logging.ERROR, error=exc.message)
        except Exception as exc:
            # The scheduler outlives one bad run; the run itself recorded its failure.
            log_event(logger, "billing_run_failed", level=logging.ERROR, error=type(exc).__name__)
        await asyncio.sleep(settings.billing_interval_seconds)


def build_app(settings: Settings, *, schedule: bool = True) -> Starlette:
    engine = create_sync_engine(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(schedule_billing(settings, engine)) if schedule else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            engine.dispose()

    async def healthz(request: object) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    receive = webhook_endpoint(engine, settings.stripe_webhook_secret.get_secret_value())
    return Starlette(
        routes=[
            Route("/v1/stripe/webhook", receive, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
