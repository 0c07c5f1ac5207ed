"""`meterline billing`: placeholder group, filled in by the billing work."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="billing (not built yet)")
