"""`meterline ingest`: placeholder group, filled in by the ingest work."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="ingest (not built yet)")
