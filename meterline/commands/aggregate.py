"""`meterline aggregate`: placeholder group, filled in by the aggregate work."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="aggregate (not built yet)")
