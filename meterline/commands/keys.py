"""`meterline keys`: create (plaintext shown once), list (prefixes only), revoke."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from meterline.commands import context
from meterline.output import cli_errors, print_json, print_table

app = typer.Typer(no_args_is_help=True, help="API keys.")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _when(value: str | None) -> datetime | None:
    from shared.errors import InvalidInput
    from shared.events import parse_timestamp

    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise InvalidInput(f"--expires-at: {exc}") from None


@app.command()
def create(
    organization: Annotated[str, typer.Option("--org", help="Organization id or slug.")],
    name: Annotated[str, typer.Option(help="What the key is for.")] = "default",
    project: Annotated[
        str | None, typer.Option(help="Project slug or id: the key may write only this project.")
    ] = None,
    user: Annotated[
        str | None, typer.Option(help="Member email: the key acts for this member.")
    ] = None,
    expires_at: Annotated[
        str | None, typer.Option("--expires-at", help="RFC 3339 expiry time.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Create a key and print its plaintext, once."""
    from shared.apikeys import create_api_key
    from shared.db import unit_of_work
    from shared.organizations import find_organization, find_project, require_user

    with cli_errors(as_json):
        settings = context.settings()
        pepper = settings.pepper_bytes()
        expiry = _when(expires_at)
        with unit_of_work(context.engine()) as session:
            found = find_organization(session, organization)
            project_id = None
            if project is not None:
                project_id = find_project(session, found.id, project).id
            user_id = None
            if user is not None:
                user_id = require_user(session, user).id
            created = create_api_key(
                session,
                organization_id=found.id,
                actor_id=None,
                name=name,
                pepper=pepper,
                project_id=project_id,
                user_id=user_id,
                expires_at=expiry,
                environment=settings.api_key_environment,
            )
            result = {
                "id": str(created.key.id),
                "prefix": created.key.prefix,
                "key": created.plaintext,
            }
    if as_json:
        print_json(result)
    else:
        typer.echo(f"created key {result['prefix']} ({result['id']})")
        typer.echo(f"key (shown once, store it now): {result['key']}")


@app.command("list")
def list_(
    organization: Annotated[str, typer.Option("--org", help="Organization id or slug.")],
    as_json: JsonOption = False,
) -> None:
    """List an organization's keys: prefixes and state, never the key."""
    from shared.apikeys import key_state, list_api_keys
    from shared.db import unit_of_work
    from shared.organizations import find_organization

    now = datetime.now(UTC)
    with cli_errors(as_json), unit_of_work(context.engine()) as session:
        found = find_organization(session, organization)
        rows = []
        for key in list_api_keys(session, found.id, actor_id=None):
            rows.append(
                {
                    "id": str(key.id),
                    "prefix": key.prefix,
                    "name": key.name,
                    "project_id": str(key.project_id) if key.project_id else None,
                    "state": key_state(key, now),
                    "last_used_at": key.last_used_at,
                    "usage_count": key.usage_count,
                    "expires_at": key.expires_at,
                }
            )
    if as_json:
        print_json(rows)
    else:
        print_table(
            ["prefix", "name", "state", "project", "last used", "requests", "id"],
            [
                (
                    r["prefix"],
                    r["name"],
                    r["state"],
                    r["project_id"] or "-",
                    r["last_used_at"] or "never",
                    r["usage_count"],
                    r["id"],
                )
                for r in rows
            ],
        )


@app.command()
def revoke(
    key: Annotated[str, typer.Argument(help="Key id or prefix.")],
) -> None:
    """Revoke a key; ingest refuses it within the key cache bound (seconds)."""
    from shared.apikeys import find_api_key, revoke_api_key
    from shared.db import unit_of_work

    with cli_errors(), unit_of_work(context.engine()) as session:
        found = find_api_key(session, key)
        revoke_api_key(session, found.id, actor_id=None, now=datetime.now(UTC))
        prefix = found.prefix
    typer.echo(f"revoked key {prefix}")
