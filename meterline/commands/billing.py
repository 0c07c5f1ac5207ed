"""`meterline billing`: run billing (invoices, Stripe reports, reconciliation) and serve the Stripe
webhook endpoint with the billing scheduler."""

from __future__ import annotations

import sys
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from meterline.output import EXIT_NEEDS_ATTENTION, cli_errors, print_json, print_table

app = typer.Typer(no_args_is_help=True, help="Billing runs, Stripe reconciliation and webhooks.")


def _parse_time(value: str | None) -> datetime:
    from shared.errors import InvalidInput

    if value is None:
        return datetime.now(UTC)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"--as-of: not an RFC 3339 time: {value!r}") from None
    if parsed.tzinfo is None:
        raise InvalidInput(f"--as-of: needs a time zone (e.g. {value}Z)")
    return parsed.astimezone(UTC)


def _parse_organization(value: str | None) -> uuid.UUID | None:
    from shared.errors import InvalidInput

    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidInput(f"--organization: not an organization id: {value!r}") from None


@app.command("run")
def run(
    as_of: Annotated[
        str | None,
        typer.Option(
            "--as-of",
            help="Bill as of this RFC 3339 time (default: now).",
            envvar="METERLINE_BILLING_AS_OF",
        ),
    ] = None,
    organization: Annotated[
        str | None, typer.Option("--organization", help="Bill only this organization (id).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Compute and print; write nothing, call no one.")
    ] = False,
    stripe: Annotated[
        bool,
        typer.Option(
            "--stripe/--no-stripe",
            help="Report usage to Stripe and reconcile (needs STRIPE_API_KEY).",
            envvar="METERLINE_BILLING_STRIPE",
        ),
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the run as one JSON document.")
    ] = False,
) -> None:
    """Invoice every subscription's current and closed periods, report usage, reconcile.

    Exit status 0: done, nothing left; 1: the run failed; 3: done, but unresolved mismatches
    remain (price or period differs, usage over-reported) that need a person."""
    with cli_errors(as_json):
        from meterline.commands import context
        from services.billing.runner import run_once

        settings = context.settings()
        result = run_once(
            context.engine(),
            settings,
            as_of=_parse_time(as_of),
            organization_id=_parse_organization(organization),
            dry_run=dry_run,
            use_stripe=stripe,
            show_progress=not as_json or sys.stderr.isatty(),
        )
        document = result.document()
        if as_json:
            print_json(document)
        else:
            _print_run(document, {str(invoice.id) for invoice in result.invoices})
        if any(not m.resolved for m in result.mismatches):
            # The run succeeded; what is left needs a person (not a failure: exit 1 is that).
            raise typer.Exit(EXIT_NEEDS_ATTENTION)


def _print_run(document: dict[str, Any], changed: set[str]) -> None:
    """Every invoice of the run; `changed` holds the ids of the ones this run wrote."""
    rows = [
        (
            inv["subscription_id"][:8],
            inv["period_start"][:10],
            inv["period_end"][:10],
            inv["status"],
            len(inv["lines"]),
            f"{inv['total']} {inv['currency']}",
            "yes" if inv["id"] in changed else "",
        )
        for inv in document["invoices"]
    ]
    print_table(["subscription", "from", "to", "status", "lines", "total", "changed"], rows)
    sys.stdout.write(
        f"{len(document['invoices'])} invoices, {len(changed)} changed, "
        f"{len(document['reported'])} meter events reported, "
        f"{len(document['mismatches'])} mismatches\n"
    )
    if document["mismatches"]:
        print_table(
            ["subscription", "kind", "metric", "ours", "theirs", "amount", "resolved"],
            [
                (
                    m["subscription_id"][:8],
                    m["kind"],
                    m.get("metric") or "",
                    m["ours"],
                    m["theirs"],
                    m.get("amount") or "",
                    "fixed" if m["resolved"] else "NO",
                )
                for m in document["mismatches"]
            ],
        )


@app.command("serve")
def serve(
    host: Annotated[
        str | None, typer.Option(help="Listen address.", envvar="METERLINE_BILLING_HOST")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Listen port.", envvar="METERLINE_BILLING_PORT")
    ] = None,
    interval: Annotated[
        int | None,
        typer.Option(
            "--interval",
            help="Seconds between scheduled billing runs.",
            envvar="METERLINE_BILLING_INTERVAL_SECONDS",
        ),
    ] = None,
    schedule: Annotated[
        bool, typer.Option("--schedule/--no-schedule", help="Run billing on the interval.")
    ] = True,
) -> None:
    """Serve POST /v1/stripe/webhook and run billing every interval (one run at a time)."""
    with cli_errors():
        import uvicorn

        from services.billing.app import build_app
        from shared.logs import configure_logging
        from shared.settings import load_settings

        overrides: dict[str, Any] = {}
        if interval is not None:
            overrides["billing_interval_seconds"] = interval
        settings = load_settings(**overrides)
        configure_logging(settings.log_level, settings.log_format)
        uvicorn.run(
            build_app(settings, schedule=schedule),
            host=host or settings.billing_host,
            port=port if port is not None else settings.billing_port,
            log_config=None,
            access_log=False,
        )
