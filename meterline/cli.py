"""`meterline`: everything an operator does, one Typer app with a group per concern."""

from __future__ import annotations

import typer

from meterline.commands import aggregate, billing, db, demo, ingest, keys, orgs, plans, replay

app = typer.Typer(
    name="meterline",
    help="Usage metering and billing: ingest, aggregation, replay, billing and Stripe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(db.app, name="db")
app.add_typer(orgs.app, name="orgs")
app.add_typer(keys.app, name="keys")
app.add_typer(plans.app, name="plans")
app.add_typer(ingest.app, name="ingest")
app.add_typer(aggregate.app, name="aggregate")
app.add_typer(replay.app, name="replay")
app.add_typer(billing.app, name="billing")
app.command("demo")(demo.demo)


def main() -> None:
    app()
