"""Wiring of a billing run: settings to gateway, the advisory lock that keeps runs single."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from sqlalchemy.engine import Engine

from services.billing import repository
from services.billing.gateway import BillingGateway, StripeGateway
from services.billing.service import RunResult, run_billing
from shared.errors import Conflict
from shared.settings import Settings


def stripe_gateway(settings: Settings) -> StripeGateway:
    return StripeGateway(
        settings.stripe_api_key.get_secret_value(),
        settings.stripe_api_base,
        rate_per_second=settings.stripe_rate_per_second,
    )


@contextmanager
def billing_lock(engine: Engine) -> Iterator[bool]:
    """Yield whether this process holds the billing lock (session-level, on its own connection,
    in autocommit: the lock outlives statements, and no transaction stays open for the run)."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        held = repository.try_lock_billing(connection)
        try:
            yield held
        finally:
            if held:
                repository.unlock_billing(connection)


def run_once(
    engine: Engine,
    settings: Settings,
    *,
    as_of: datetime,
    organization_id: uuid.UUID | None = None,
    dry_run: bool = False,
    use_stripe: bool = True,
    gateway: BillingGateway | None = None,
    show_progress: bool = False,
    list_invoices: bool = True,
) -> RunResult:
    """One billing run under the lock; Conflict when another run holds it."""
    if gateway is None and use_stripe and not dry_run:
        gateway = stripe_gateway(settings)
    with billing_lock(engine) as held:
        if not held:
            raise Conflict("another billing run is in progress; try again when it finishes")
        with _progress(show_progress and sys.stderr.isatty()) as progress:
            return run_billing(
                engine,
                as_of=as_of,
                now=datetime.now(UTC),
                lateness_horizon=settings.lateness_horizon,
                organization_id=organization_id,
                dry_run=dry_run,
                gateway=gateway if use_stripe else None,
                settle=timedelta(seconds=settings.stripe_settle_seconds),
                progress=progress,
                list_invoices=list_invoices,
            )


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "billing",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("billing", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance
