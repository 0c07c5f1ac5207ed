"""`meterline db`: migrate the schema and load sample data."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from meterline.commands import context
from meterline.output import cli_errors, print_json

app = typer.Typer(no_args_is_help=True, help="Schema migrations and sample data.")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.command()
def upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Migrate the database up to REVISION (default: the newest)."""
    from shared import migrate

    with cli_errors():
        context.engine()
        migrate.upgrade(context.settings().database_url, revision)
        typer.echo(f"database at {migrate.current(context.settings().database_url)}")


@app.command()
def downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision, e.g. -1 or base.")],
) -> None:
    """Migrate the database down to REVISION."""
    from shared import migrate

    with cli_errors():
        context.engine()
        migrate.downgrade(context.settings().database_url, revision)
        typer.echo(f"database at {migrate.current(context.settings().database_url) or 'base'}")


@app.command()
def current() -> None:
    """Print the database's schema revision."""
    from shared import migrate

    with cli_errors():
        context.engine()
        typer.echo(migrate.current(context.settings().database_url) or "base (empty)")


@app.command()
def seed(as_json: JsonOption = False) -> None:
    """Load sample plans, two organizations with members, projects, subscriptions and keys.

    The keys' plaintext is printed once, here, and never again.
    """
    from shared.db import unit_of_work
    from shared.seed import seed as run_seed

    with cli_errors(as_json):
        settings = context.settings()
        with unit_of_work(context.engine()) as session:
            result = run_seed(
                session,
                pepper=settings.pepper_bytes(),
                now=datetime.now(UTC),
                environment=settings.api_key_environment,
            )
    if as_json:
        print_json(
            {
                "already_seeded": result.already_seeded,
                "plans": result.plans,
                "organizations": result.organizations,
                "keys": [key.__dict__ for key in result.keys],
            }
        )
        return
    typer.echo(f"plans: {', '.join(result.plans)}")
    if result.already_seeded:
        typer.echo(
            "organizations already seeded; keys are shown only once. "
            "Make a new one with `meterline keys create`."
        )
        return
    typer.echo(f"organizations: {', '.join(result.organizations)}")
    typer.echo("API keys (shown once; store them now):")
    for key in result.keys:
        typer.echo(f"  {key.organization:<8} {key.project or '(all projects)':<15} {key.plaintext}")
