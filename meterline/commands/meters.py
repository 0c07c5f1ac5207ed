"""`meterline meters`: apply a meter file (JSON or YAML, upsert by metric) and list the meters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from meterline.output import cli_errors, print_json, print_table

app = typer.Typer(
    no_args_is_help=True, help="Meters: a metric's aggregation and the properties it groups by."
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.command("apply")
def apply(
    file: Annotated[Path, typer.Argument(help="Meter file, JSON or YAML: {meters: [...]}.")],
    as_json: JsonOption = False,
) -> None:
    """Create or update meters from FILE by metric, after validating every meter."""
    with cli_errors(as_json):
        from meterline.commands import context
        from shared.db import unit_of_work
        from shared.meters import apply_meters, read_meter_file

        meters = read_meter_file(file)
        with unit_of_work(context.engine()) as session:
            outcome = apply_meters(session, meters)
        if as_json:
            print_json({"meters": [{"metric": m, "result": r} for m, r in outcome]})
        else:
            print_table(["metric", "result"], outcome)


@app.command("list")
def list_(as_json: JsonOption = False) -> None:
    """List every meter: metric, aggregation, dimensions, counted property."""
    with cli_errors(as_json):
        from meterline.commands import context
        from shared.db import unit_of_work
        from shared.meters import list_meters

        with unit_of_work(context.engine()) as session:
            meters = list_meters(session)
        if as_json:
            print_json({"meters": [m.document() for m in meters]})
            return
        print_table(
            ["metric", "aggregation", "dimensions", "property", "value_property"],
            [
                (
                    m.metric,
                    m.aggregation,
                    ", ".join(m.dimensions),
                    m.property or "",
                    m.value_property or "",
                )
                for m in meters
            ],
        )
