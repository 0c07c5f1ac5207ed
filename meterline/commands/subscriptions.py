"""`meterline subscriptions`: create, list, show, change the plan of and cancel subscriptions."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

import typer

from meterline.output import cli_errors, print_json, print_table

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from shared.models import Subscription

app = typer.Typer(no_args_is_help=True, help="Subscriptions: one live one per organization.")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
IdArgument = Annotated[str, typer.Argument(help="Subscription id.")]


def _now() -> datetime:
    # Whole seconds, as Stripe counts them: prorations then match Stripe's to the second.
    return datetime.now(UTC).replace(microsecond=0)


def _id(value: str) -> uuid.UUID:
    from shared.errors import InvalidInput

    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidInput(f"not a subscription id: {value!r}") from None


def _start(value: str | None, horizon: timedelta) -> datetime:
    """--start: now by default; a past start only within the lateness horizon (older usage
    cannot be billed exactly), never in the future."""
    from shared.errors import InvalidInput

    now = _now()
    if value is None:
        return now
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"--start: not an RFC 3339 time: {value!r}") from None
    if parsed.tzinfo is None:
        raise InvalidInput(f"--start: needs a time zone (e.g. {value}Z)")
    parsed = parsed.astimezone(UTC)
    if parsed > now + timedelta(seconds=60):
        raise InvalidInput("--start: must not be in the future")
    if parsed < now - horizon:
        raise InvalidInput(
            f"--start: must be within the lateness horizon ({horizon.days} days) of now"
        )
    return parsed


def _document(
    session: Session, subscription: Subscription, *, phases: bool = False
) -> dict[str, object]:
    from services.billing.documents import subscription_documents

    [document] = subscription_documents(session, [subscription], phases=phases)
    return document


def _print(document: dict[str, object]) -> None:
    print_table(
        [
            "id",
            "external id",
            "organization",
            "plan",
            "status",
            "interval",
            "current period",
            "canceled at",
        ],
        [
            (
                document["id"],
                document["external_id"] or "-",
                document["organization"],
                document["plan"],
                document["status"],
                document["billing_interval"],
                f"{document['current_period_start']} to {document['current_period_end']}",
                document["canceled_at"]
                or ("at period end" if document["cancel_at_period_end"] else ""),
            )
        ],
    )


@app.command("create")
def create(
    organization: Annotated[str, typer.Option("--org", help="Organization id or slug.")],
    plan: Annotated[str, typer.Option("--plan", help="Plan key or id.")],
    interval: Annotated[
        str, typer.Option("--interval", help="month or year.", case_sensitive=False)
    ] = "month",
    trial_days: Annotated[int, typer.Option("--trial-days", help="Days of trial.")] = 0,
    start: Annotated[
        str | None,
        typer.Option("--start", help="RFC 3339 start (default now; past within the horizon)."),
    ] = None,
    external_id: Annotated[
        str | None,
        typer.Option(
            "--external-id",
            help="Unique id your own system knows it by (Lago's external_subscription_id).",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Subscribe an organization to a plan, anchored at its start."""
    with cli_errors(as_json):
        from meterline.commands import context
        from services.billing.plans import find_plan
        from shared.db import unit_of_work
        from shared.errors import InvalidInput
        from shared.models import BillingInterval
        from shared.organizations import find_organization
        from shared.subscriptions import create_subscription

        try:
            billing_interval = BillingInterval(interval.lower())
        except ValueError:
            raise InvalidInput(f"--interval: {interval!r} is not month or year") from None
        settings = context.settings()
        begins = _start(start, settings.lateness_horizon)
        with unit_of_work(context.engine()) as session:
            found = find_organization(session, organization)
            subscription = create_subscription(
                session,
                organization_id=found.id,
                plan_id=find_plan(session, plan).id,
                interval=billing_interval,
                now=begins,
                trial_days=trial_days,
                external_id=external_id,
            )
            document = _document(session, subscription)
        if as_json:
            print_json(document)
        else:
            _print(document)


@app.command("list")
def list_(
    organization: Annotated[
        str | None, typer.Option("--org", help="Only this organization (id or slug).")
    ] = None,
    status: Annotated[str | None, typer.Option("--status", help="Only this status.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List subscriptions, newest first."""
    with cli_errors(as_json):
        from meterline.commands import context
        from services.billing.documents import subscription_documents
        from shared.db import unit_of_work
        from shared.errors import InvalidInput
        from shared.models import SubscriptionStatus
        from shared.organizations import find_organization
        from shared.subscription_repository import list_subscriptions

        try:
            wanted = SubscriptionStatus(status) if status else None
        except ValueError:
            raise InvalidInput(f"--status: unknown status {status!r}") from None
        with unit_of_work(context.engine()) as session:
            org_id = find_organization(session, organization).id if organization else None
            documents = subscription_documents(
                session, list_subscriptions(session, organization_id=org_id, status=wanted)
            )
        if as_json:
            print_json({"subscriptions": documents})
            return
        print_table(
            ["id", "external id", "organization", "plan", "status", "interval", "period end"],
            [
                (d["id"], d["external_id"] or "-", d["organization"], d["plan"], d["status"],
                 d["billing_interval"], d["current_period_end"])
                for d in documents
            ],
        )  # fmt: skip


@app.command("show")
def show(subscription_id: IdArgument, as_json: JsonOption = False) -> None:
    """A subscription with its plan phases."""
    with cli_errors(as_json):
        from meterline.commands import context
        from shared.db import unit_of_work
        from shared.subscriptions import get_subscription

        with unit_of_work(context.engine()) as session:
            document = _document(
                session, get_subscription(session, _id(subscription_id)), phases=True
            )
        if as_json:
            print_json(document)
            return
        _print(document)
        phases = document.get("phases") or []
        assert isinstance(phases, list)
        print_table(["plan", "from"], [(p["plan"], p["starts_at"]) for p in phases])


@app.command("change-plan")
def change_plan_(
    subscription_id: IdArgument,
    plan: Annotated[str, typer.Option("--plan", help="The new plan's key or id.")],
    as_json: JsonOption = False,
) -> None:
    """Move a subscription to another plan from now on: billing splits the current period here
    (each side on its own plan, the flat fees prorated as Stripe does)."""
    with cli_errors(as_json):
        from meterline.commands import context
        from services.billing.plans import find_plan
        from shared.db import unit_of_work
        from shared.subscriptions import change_plan

        with unit_of_work(context.engine()) as session:
            subscription = change_plan(
                session, _id(subscription_id), plan_id=find_plan(session, plan).id, now=_now()
            )
            document = _document(session, subscription, phases=True)
        if as_json:
            print_json(document)
        else:
            _print(document)


@app.command("cancel")
def cancel(
    subscription_id: IdArgument,
    at_period_end: Annotated[
        bool, typer.Option("--at-period-end", help="Cancel when the current period ends.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Cancel now (billing ends now; the flat fee is prorated to now) or at the period's end."""
    with cli_errors(as_json):
        from meterline.commands import context
        from shared.db import unit_of_work
        from shared.subscriptions import cancel_at_period_end, cancel_now

        with unit_of_work(context.engine()) as session:
            if at_period_end:
                subscription = cancel_at_period_end(session, _id(subscription_id))
            else:
                subscription = cancel_now(session, _id(subscription_id), now=_now())
            document = _document(session, subscription)
        if as_json:
            print_json(document)
        else:
            _print(document)
