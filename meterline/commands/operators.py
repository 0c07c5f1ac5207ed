"""`meterline operators`: tokens for the console and admin API (admin or viewer), shown once."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from meterline.commands import context
from meterline.output import cli_errors, print_json, print_table

app = typer.Typer(no_args_is_help=True, help="Operators of the console and the admin API.")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="Who the token is for, e.g. alice.")],
    role: Annotated[
        str, typer.Option("--role", help="admin (reads and changes) or viewer (reads only).")
    ] = "viewer",
    as_json: JsonOption = False,
) -> None:
    """Create an operator and print its token, once."""
    from shared.audit import CLI_ACTOR, Actor, record_change
    from shared.db import unit_of_work
    from shared.operators import create_operator, parse_role

    with cli_errors(as_json):
        chosen = parse_role(role)
        pepper = context.settings().pepper_bytes()
        with unit_of_work(context.engine()) as session:
            created = create_operator(session, name=name, role=chosen, pepper=pepper)
            record_change(
                session,
                Actor(CLI_ACTOR),
                "operator.create",
                target_type="operator",
                target_id=created.operator.id,
                details={"name": created.operator.name, "role": str(chosen)},
            )
            result = {
                "id": str(created.operator.id),
                "name": created.operator.name,
                "role": str(chosen),
                "prefix": created.operator.prefix,
                "token": created.plaintext,
            }
    if as_json:
        print_json(result)
    else:
        typer.echo(f"created {result['role']} operator {result['name']} ({result['prefix']})")
        typer.echo(f"token (shown once, store it now): {result['token']}")


@app.command("list")
def list_(as_json: JsonOption = False) -> None:
    """List operators: names, roles and token prefixes, never the token."""
    from shared.db import unit_of_work
    from shared.operators import list_operators

    with cli_errors(as_json), unit_of_work(context.engine()) as session:
        rows = [
            {
                "id": str(o.id),
                "name": o.name,
                "role": str(o.role),
                "prefix": o.prefix,
                "state": "revoked" if o.revoked_at else "active",
                "last_used_at": o.last_used_at,
                "created_at": o.created_at,
            }
            for o in list_operators(session)
        ]
    if as_json:
        print_json(rows)
    else:
        print_table(
            ["name", "role", "prefix", "state", "last used", "id"],
            [
                (
                    r["name"],
                    r["role"],
                    r["prefix"],
                    r["state"],
                    r["last_used_at"] or "never",
                    r["id"],
                )
                for r in rows
            ],
        )


@app.command()
def revoke(
    operator: Annotated[str, typer.Argument(help="Operator name, token prefix or id.")],
) -> None:
    """Revoke an operator's token and end its browser sessions now."""
    from shared.audit import CLI_ACTOR, Actor, record_change
    from shared.db import unit_of_work
    from shared.operators import find_operator, revoke_operator

    with cli_errors(), unit_of_work(context.engine()) as session:
        found = find_operator(session, operator)
        revoke_operator(session, found.id, now=datetime.now(UTC))
        record_change(
            session,
            Actor(CLI_ACTOR),
            "operator.revoke",
            target_type="operator",
            target_id=found.id,
            details={"name": found.name},
        )
        name = found.name
    typer.echo(f"revoked operator {name}")
