"""`meterline orgs`: organizations, their members and projects."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from meterline.commands import context
from meterline.output import cli_errors, print_json, print_table
from shared.models import Role

app = typer.Typer(
    no_args_is_help=False,
    invoke_without_command=True,
    help="Organizations, members and projects. Without a subcommand: list organizations.",
)
members = typer.Typer(no_args_is_help=True, help="Members and their roles.")
projects = typer.Typer(no_args_is_help=True, help="Projects of an organization.")
app.add_typer(members, name="members")
app.add_typer(projects, name="projects")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
OrgArgument = Annotated[str, typer.Argument(help="Organization id or slug.")]
RoleOption = Annotated[
    str, typer.Option("--role", help="owner, admin, member or billing.", case_sensitive=False)
]


def _role(value: str) -> Role:
    from shared.errors import InvalidInput

    try:
        return Role(value.lower())
    except ValueError:
        raise InvalidInput(f"unknown role {value!r}: use owner, admin, member or billing") from None


@app.callback()
def _default(ctx: typer.Context, as_json: JsonOption = False) -> None:
    if ctx.invoked_subcommand is None:
        list_(as_json)


@app.command("list")
def list_(as_json: JsonOption = False) -> None:
    """List organizations."""
    from shared.db import unit_of_work
    from shared.organizations import list_organizations

    with cli_errors(as_json), unit_of_work(context.engine()) as session:
        rows = [
            {
                "id": str(o.id),
                "slug": o.slug,
                "name": o.name,
                "external_id": o.external_id,
                "stripe_customer_id": o.stripe_customer_id,
            }
            for o in list_organizations(session)
        ]
    if as_json:
        print_json(rows)
    else:
        print_table(
            ["id", "slug", "name", "external id", "stripe customer"],
            [
                (r["id"], r["slug"], r["name"], r["external_id"] or "-", r["stripe_customer_id"])
                for r in rows
            ],
        )


@app.command()
def create(
    slug: Annotated[str, typer.Argument(help="Unique slug, e.g. acme.")],
    owner_email: Annotated[
        str, typer.Option("--owner", help="Email of the owner (created if new).")
    ],
    name: Annotated[str | None, typer.Option(help="Display name (default: the slug).")] = None,
    external_id: Annotated[
        str | None,
        typer.Option(
            "--external-id",
            help="Unique id your own system knows it by (a platform key's customer).",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Create an organization with its first owner."""
    from shared.db import unit_of_work
    from shared.organizations import create_organization, create_user, find_user

    with cli_errors(as_json), unit_of_work(context.engine()) as session:
        owner = find_user(session, owner_email) or create_user(session, email=owner_email)
        organization = create_organization(
            session, name=name or slug, slug=slug, owner_id=owner.id, external_id=external_id
        )
        result = {
            "id": str(organization.id),
            "slug": organization.slug,
            "external_id": organization.external_id,
            "owner": owner.email,
        }
    if as_json:
        print_json(result)
    else:
        typer.echo(f"created organization {result['slug']} ({result['id']}) owned by {owner.email}")


@app.command()
def delete(
    organization: OrgArgument,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: usage and keys go too.")] = False,
) -> None:
    """Delete an organization with its members, projects, keys, subscriptions and usage."""
    from shared.db import unit_of_work
    from shared.organizations import delete_organization, find_organization

    with cli_errors():
        if not yes:
            from shared.errors import InvalidInput

            raise InvalidInput(
                "deleting an organization deletes its usage too; add --yes to confirm"
            )
        with unit_of_work(context.engine()) as session:
            found = find_organization(session, organization)
            delete_organization(session, found.id, actor_id=None)
    typer.echo(f"deleted organization {organization}")


@members.command("list")
def members_list(organization: OrgArgument, as_json: JsonOption = False) -> None:
    """List members and roles."""
    from shared.db import unit_of_work
    from shared.organizations import find_organization, list_members

    with cli_errors(as_json), unit_of_work(context.engine()) as session:
        found = find_organization(session, organization)
        rows = [
            {"user_id": str(u.id), "email": u.email, "role": str(role)}
            for u, role in list_members(session, found.id)
        ]
    if as_json:
        print_json(rows)
    else:
        print_table(["user id", "email", "role"], [tuple(r.values()) for r in rows])


@members.command("add")
def members_add(
    organization: OrgArgument,
    email: Annotated[str, typer.Argument(help="Member's email (user created if new).")],
    role: RoleOption = "member",
) -> None:
    """Add a member with a role."""
    from shared.db import unit_of_work
    from shared.organizations import add_member, create_user, find_organization, find_user

    with cli_errors(), unit_of_work(context.engine()) as session:
        found = find_organization(session, organization)
        user = find_user(session, email) or create_user(session, email=email)
        add_member(session, found.id, actor_id=None, user_id=user.id, role=_role(role))
    typer.echo(f"added {email} to {organization} as {role.lower()}")


@members.command("role")
def members_role(
    organization: OrgArgument,
    email: Annotated[str, typer.Argument(help="Member's email.")],
    role: RoleOption,
) -> None:
    """Change a member's role (an organization always keeps one owner)."""
    from shared.db import unit_of_work
    from shared.organizations import change_role, find_organization, require_user

    with cli_errors(), unit_of_work(context.engine()) as session:
        found = find_organization(session, organization)
        user = require_user(session, email)
        change_role(session, found.id, actor_id=None, user_id=user.id, role=_role(role))
    typer.echo(f"{email} is now {role.lower()} of {organization}")


@members.command("remove")
def members_remove(
    organization: OrgArgument, email: Annotated[str, typer.Argument(help="Member's email.")]
) -> None:
    """Remove a member; their user-scoped keys are revoked."""
    from shared.db import unit_of_work
    from shared.organizations import find_organization, remove_member, require_user

    with cli_errors(), unit_of_work(context.engine()) as session:
        found = find_organization(session, organization)
        user = require_user(session, email)
        remove_member(session, found.id, actor_id=None, user_id=user.id)
    typer.echo(f"removed {email} from {organization}")


@projects.command("list")
def projects_list(organization: OrgArgument, as_json: JsonOption = False) -> None:
    """List an organization's projects."""
    from shared.db import unit_of_work
    from shared.organizations import find_organization, list_projects

    with cli_errors(as_json), unit_of_work(context.engine()) as session:
        found = find_organization(session, organization)
        rows = [
            {"id": str(p.id), "slug": p.slug, "name": p.name, "archived_at": p.archived_at}
            for p in list_projects(session, found.id)
        ]
    if as_json:
        print_json(rows)
    else:
        print_table(["id", "slug", "name", "archived"], [tuple(r.values()) for r in rows])


@projects.command("create")
def projects_create(
    organization: OrgArgument,
    slug: Annotated[str, typer.Argument(help="Slug, unique within the organization.")],
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
) -> None:
    """Create a project."""
    from shared.db import unit_of_work
    from shared.organizations import create_project, find_organization

    with cli_errors(), unit_of_work(context.engine()) as session:
        found = find_organization(session, organization)
        project = create_project(session, found.id, actor_id=None, name=name or slug, slug=slug)
        project_id = project.id
    typer.echo(f"created project {slug} ({project_id})")


@projects.command("archive")
def projects_archive(
    organization: OrgArgument, slug: Annotated[str, typer.Argument(help="Project slug.")]
) -> None:
    """Archive a project and revoke its keys (usage is kept)."""
    from shared.db import unit_of_work
    from shared.organizations import archive_project, find_organization, find_project

    with cli_errors(), unit_of_work(context.engine()) as session:
        found = find_organization(session, organization)
        project = find_project(session, found.id, slug)
        archive_project(session, project.id, actor_id=None, now=datetime.now(UTC))
    typer.echo(f"archived project {slug}")
