"""`meterline replay`: placeholder group, filled in by the replay work."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="replay (not built yet)")
