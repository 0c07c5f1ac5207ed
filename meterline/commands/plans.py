"""`meterline plans`: apply a plan file (JSON or YAML, upsert by key) and list the plans."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from meterline.output import cli_errors, print_json, print_table

app = typer.Typer(no_args_is_help=True, help="Plans: flat prices and metered prices (features).")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.command("apply")
def apply(
    file: Annotated[
        Path, typer.Argument(help="Plan file, JSON or YAML: {plans: [...]} or a list.")
    ],
    as_json: JsonOption = False,
) -> None:
    """Create or update plans from FILE by key, after validating every plan's features."""
    with cli_errors(as_json):
        from meterline.commands import context
        from services.billing.plans import apply_plans, read_plan_file
        from shared.db import unit_of_work

        plans = read_plan_file(file)
        with unit_of_work(context.engine()) as session:
            outcome = apply_plans(session, plans)
        if as_json:
            print_json({"plans": [{"key": key, "result": result} for key, result in outcome]})
        else:
            print_table(["key", "result"], outcome)


@app.command("list")
def list_(as_json: JsonOption = False) -> None:
    """List every plan with its flat prices and metered metrics."""
    with cli_errors(as_json):
        from meterline.commands import context
        from services.billing.plans import list_plans, plan_document
        from shared.db import unit_of_work

        with unit_of_work(context.engine()) as session:
            documents = [plan_document(plan) for plan in list_plans(session)]
        if as_json:
            print_json({"plans": documents})
            return
        rows = [
            (
                doc["key"],
                doc["name"],
                doc["currency"],
                doc["price_monthly"],
                doc["price_yearly"],
                ", ".join(sorted((doc["features"] or {}).get("metered", {}))),
                "yes" if doc["active"] else "no",
            )
            for doc in documents
        ]
        print_table(["key", "name", "currency", "monthly", "yearly", "metered", "active"], rows)
