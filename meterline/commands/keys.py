"""`meterline keys`: create (plaintext shown once), list (prefixes only), revoke."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer

from meterline.commands import context
from meterline.output import cli_errors, print_json, print_table

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from shared.apikeys import CreatedKey

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
    organization: Annotated[
        str | None, typer.Option("--org", help="Organization id or slug.")
    ] = None,
    platform: Annotated[
        bool,
        typer.Option(
            "--platform",
            help="An operator's key for every organization: each event names its customer.",
        ),
    ] = False,
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
    """Create a key and print its plaintext, once: an organization's (--org) or a platform key."""
    from shared.apikeys import create_platform_key
    from shared.db import unit_of_work
    from shared.errors import InvalidInput

    if not platform and organization is None:  # a usage error (status 2), as a missing option is
        from meterline.cli import UsageError

        raise UsageError("Missing option '--org' (or --platform for a platform key).")
    with cli_errors(as_json):
        settings = context.settings()
        pepper = settings.pepper_bytes()
        expiry = _when(expires_at)
        if platform and (organization or project or user):
            raise InvalidInput("--platform: a platform key has no --org, --project or --user")
        with unit_of_work(context.engine()) as session:
            created: CreatedKey
            if platform:
                created = create_platform_key(
                    session,
                    name=name,
                    pepper=pepper,
                    expires_at=expiry,
                    environment=settings.api_key_environment,
                )
            else:
                assert organization is not None
                created = _create_organization_key(
                    session, organization, project, user, name, expiry
                )
            result = {
                "id": str(created.key.id),
                "prefix": created.key.prefix,
                "platform": created.key.platform,
                "key": created.plaintext,
            }
    if as_json:
        print_json(result)
    else:
        kind = "platform key" if platform else "key"
        typer.echo(f"created {kind} {result['prefix']} ({result['id']})")
        typer.echo(f"key (shown once, store it now): {result['key']}")


def _create_organization_key(
    session: Session,
    organization: str,
    project: str | None,
    user: str | None,
    name: str,
    expiry: datetime | None,
) -> CreatedKey:
    from shared.apikeys import create_api_key
    from shared.organizations import find_organization, find_project, require_user

    settings = context.settings()
    found = find_organization(session, organization)
    project_id = find_project(session, found.id, project).id if project is not None else None
    user_id = require_user(session, user).id if user is not None else None
    return create_api_key(
        session,
        organization_id=found.id,
        actor_id=None,
        name=name,
        pepper=settings.pepper_bytes(),
        project_id=project_id,
        user_id=user_id,
        expires_at=expiry,
        environment=settings.api_key_environment,
    )


@app.command("list")
def list_(
    organization: Annotated[
        str | None, typer.Option("--org", help="Organization id or slug.")
    ] = None,
    platform: Annotated[bool, typer.Option("--platform", help="List the platform keys.")] = False,
    as_json: JsonOption = False,
) -> None:
    """List an organization's keys, or the platform keys: prefixes and state, never the key."""
    from shared.apikeys import key_state, list_api_keys, list_platform_keys
    from shared.db import unit_of_work
    from shared.errors import InvalidInput
    from shared.organizations import find_organization

    now = datetime.now(UTC)
    with cli_errors(as_json), unit_of_work(context.engine()) as session:
        if platform == (organization is not None):
            raise InvalidInput("list one organization's keys (--org) or the --platform keys")
        if platform:
            keys = list_platform_keys(session)
        else:
            assert organization is not None
            keys = list_api_keys(
                session, find_organization(session, organization).id, actor_id=None
            )
        rows = []
        for key in keys:
            rows.append(
                {
                    "id": str(key.id),
                    "prefix": key.prefix,
                    "name": key.name,
                    "project_id": str(key.project_id) if key.project_id else None,
                    "platform": key.platform,
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
