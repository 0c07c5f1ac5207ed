"""`meterline ingest`: run the HTTP ingest service (POST /v1/events -> Kafka)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from meterline.output import cli_errors

app = typer.Typer(no_args_is_help=True, help="The HTTP ingest service.")


@app.command()
def serve(
    host: Annotated[
        str | None,
        typer.Option(help="Address to listen on (default: METERLINE_INGEST_HOST, 127.0.0.1)."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="Port to listen on (default: METERLINE_INGEST_PORT, 8080).", min=1, max=65535
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Worker processes, each with its own producer, key cache and rate limiter "
            "(default: METERLINE_INGEST_WORKERS, 1).",
            min=1,
            max=64,
        ),
    ] = None,
) -> None:
    """Serve POST /v1/events, GET /v1/usage, /healthz, /readyz, /metrics and /openapi.json,
    and the OpenMeter (/openmeter) and Lago (/lago) drop-in ingest routes."""
    with cli_errors():
        import uvicorn

        from shared.logs import configure_logging, log_event, register_secret
        from shared.settings import get_settings

        # Settings read the environment and .local/env alike; an option wins over both.
        settings = get_settings()
        host = host or settings.ingest_host
        port = port if port is not None else settings.ingest_port
        workers = workers if workers is not None else settings.ingest_workers
        register_secret(settings.pepper_bytes().decode())  # refuses a missing pepper up front
        configure_logging(settings.log_level, settings.log_format)
        # Metrics of all workers are summed from one directory, fresh for each run.
        metrics_dir = tempfile.mkdtemp(prefix="meterline-ingest-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

        log_event(
            logging.getLogger("meterline.ingest"),
            "ingest_serving",
            host=host,
            port=port,
            workers=workers,
        )
        try:
            uvicorn.run(
                "services.ingest.app:create_app",
                factory=True,
                host=host,
                port=port,
                workers=workers,
                loop="uvloop",
                http="services.ingest.frontdoor:FrontDoor",
                access_log=False,
                log_config=None,
                timeout_graceful_shutdown=10,
            )
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)


@app.command("openapi")
def openapi(
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write to this file instead of standard output."),
    ] = None,
) -> None:
    """Print the OpenAPI document that the service serves at /openapi.json (the repository keeps
    a copy in services/ingest/openapi.json; refresh it with --output)."""
    with cli_errors():
        from services.ingest.openapi import openapi_text

        text = openapi_text()
        if output is None:
            typer.echo(text, nl=False)
        else:
            output.write_text(text)
            typer.echo(f"wrote {output}")
