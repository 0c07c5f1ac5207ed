"""`meterline aggregate`: run the stream aggregator; maintain the event ledger's partitions."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from meterline.output import cli_errors, print_json

app = typer.Typer(no_args_is_help=True, help="Roll usage events from Kafka into usage_records.")


@app.command("run")
def run(
    port: Annotated[
        int | None,
        typer.Option(
            help="Port of /healthz and /metrics (default 6066).",
            envvar="METERLINE_AGGREGATOR_PORT",
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(
            help="Log level: DEBUG, INFO, WARNING, ERROR or CRITICAL (default: "
            "METERLINE_LOG_LEVEL, else INFO)."
        ),
    ] = None,
) -> None:
    """Consume the events topic until stopped (SIGTERM/SIGINT: finish what can be finished
    within METERLINE_AGGREGATOR_STOP_SECONDS, default 8, then exit)."""
    with cli_errors():
        from services.aggregator.app import (
            AggregatorWorker,
            create_app,
            ensure_web_port_free,
            wait_for_topics,
        )
        from shared.logs import configure_logging, register_secret
        from shared.settings import load_settings

        overrides: dict[str, object] = {}
        if port is not None:
            overrides["aggregator_web_port"] = port
        if log_level is not None:
            overrides["log_level"] = log_level
        settings = load_settings(**overrides)
        register_secret(settings.api_key_pepper.get_secret_value())
        configure_logging(settings.log_level, settings.log_format)
        if logging.getLogger().level >= logging.INFO:
            # Faust, mode, aiokafka and kafka-python (the backlog reads) narrate every step at
            # INFO; keep their warnings.
            for name in ("faust", "mode", "aiokafka", "kafka"):
                logging.getLogger(name).setLevel(logging.WARNING)
        ensure_web_port_free(settings)
        wait_for_topics(settings)
        faust_app, _ = create_app(settings)
        worker = AggregatorWorker(
            faust_app,
            stop_seconds=settings.aggregator_stop_seconds,
            loglevel=settings.log_level,
            quiet=True,
            override_logging=False,
        )
    worker.execute_from_commandline()


@app.command("prune-ledger")
def prune_ledger(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the partitions that would be dropped.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Prune by the clock alone, even while the aggregator lags beyond the grace or "
            "its backlog cannot be read (its oldest events are then dead-lettered, retryable).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Create the current and next month's ledger partitions; drop those that no event the
    aggregator has yet to process can need."""
    with cli_errors(as_json):
        from datetime import UTC, datetime, timedelta

        from meterline.commands.context import engine, settings
        from services.aggregator.app import app_id
        from services.aggregator.consumer_lag import group_backlog
        from services.aggregator.ledger_partitions import (
            ledger_cutoff,
            maintain_ledger,
            prune_cutoff,
        )
        from shared.errors import BrokerUnavailable, Conflict

        config = settings()
        now = datetime.now(UTC)
        group = app_id(config)
        oldest = None
        try:
            oldest = group_backlog(config, group, config.events_topic).oldest_received_at
        except BrokerUnavailable as exc:
            if not force:
                raise BrokerUnavailable(
                    f"{exc.message}; without the backlog nothing is dropped (--force prunes by "
                    "the clock alone)"
                ) from None
        grace = timedelta(hours=config.ledger_grace_hours)
        if oldest is not None and now - oldest > grace and not force:
            hours = (now - oldest).total_seconds() / 3600
            raise Conflict(
                f"the aggregator group {group} lags {hours:.0f} h (oldest unprocessed record "
                f"received {oldest.isoformat()}), beyond the {config.ledger_grace_hours} h grace: "
                "refusing to prune until it catches up (--force drops by the clock alone)"
            )
        cutoff = ledger_cutoff(now, config) if force else prune_cutoff(now, config, oldest)
        created, dropped = maintain_ledger(engine(), now, cutoff=cutoff, dry_run=dry_run)
        if as_json:
            print_json(
                {
                    "cutoff": cutoff,
                    "oldest_unprocessed": oldest,
                    "forced": force,
                    "created": created,
                    "dropped": dropped,
                    "dry_run": dry_run,
                }
            )
            return
        verb = "would drop" if dry_run else "dropped"
        typer.echo(f"ledger cutoff {cutoff.isoformat()}")
        typer.echo(f"oldest unprocessed record: {oldest.isoformat() if oldest else 'none'}")
        typer.echo(f"created: {', '.join(created) or 'none'}")
        typer.echo(f"{verb}: {', '.join(dropped) or 'none'}")
