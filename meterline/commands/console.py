"""`meterline console`: the web console at / and the admin API under /admin/v1/."""

from __future__ import annotations

from typing import Annotated

import typer

from meterline.output import cli_errors


def console(
    host: Annotated[
        str | None, typer.Option(help="Listen address.", envvar="METERLINE_CONSOLE_HOST")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Listen port.", envvar="METERLINE_CONSOLE_PORT")
    ] = None,
    sample: Annotated[
        bool,
        typer.Option(
            "--sample/--no-sample",
            help="Sample pipeline health for the throughput and lag charts.",
        ),
    ] = True,
) -> None:
    """Serve the operator console and the admin API (log in with an operator token)."""
    with cli_errors():
        import uvicorn

        from services.console.app import create_app
        from shared.settings import load_settings

        settings = load_settings()
        uvicorn.run(
            create_app(settings, sample=sample),
            host=host or settings.console_host,
            port=port if port is not None else settings.console_port,
            log_config=None,
            access_log=False,
        )
