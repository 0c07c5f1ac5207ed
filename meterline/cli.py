"""`meterline`: everything an operator does, one Typer app with a group per concern.

Exit statuses (meterline.output): 0 done, 1 failed, 2 a usage error, 3 done but needs a person.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated

import typer

from meterline.commands import (
    aggregate,
    billing,
    console,
    db,
    demo,
    ingest,
    invoices,
    keys,
    meters,
    operators,
    orgs,
    plans,
    replay,
    subscriptions,
)
from meterline.output import EXIT_ERROR, EXIT_OK, EXIT_USAGE, error_document

app = typer.Typer(
    name="meterline",
    help="Usage metering and billing: ingest, aggregation, replay, billing and Stripe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"meterline {version('meterline')} (client {version('meterline-client')})")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Usage metering and billing: ingest, aggregation, replay, billing and Stripe."""


app.add_typer(db.app, name="db")
app.add_typer(orgs.app, name="orgs")
app.add_typer(keys.app, name="keys")
app.add_typer(plans.app, name="plans")
app.add_typer(meters.app, name="meters")
app.add_typer(ingest.app, name="ingest")
app.add_typer(aggregate.app, name="aggregate")
app.add_typer(replay.app, name="replay")
app.add_typer(billing.app, name="billing")
app.add_typer(operators.app, name="operators")
app.command("console")(console.console)
app.add_typer(subscriptions.app, name="subscriptions")
app.add_typer(invoices.app, name="invoices")
app.command("demo")(demo.demo)


def _click_exception(name: str) -> type[Exception]:
    """click's exception class of that name, as the installed Typer uses it (Typer 0.29 and later
    carry their own copy of click, whose classes are not the `click` package's)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


UsageError = _click_exception("UsageError")
ClickException = _click_exception("ClickException")


def _wants_json(args: Sequence[str]) -> bool:
    return "--json" in args[: args.index("--")] if "--" in args else "--json" in args


def main(args: Sequence[str] | None = None) -> None:
    """Run the command line; a usage error is the usage text (or, under --json, one JSON error
    document) on stderr and exit status 2."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        status = app(args=argv, prog_name="meterline", standalone_mode=False)
    except UsageError as exc:
        # `meterline` alone (or a group alone) shows its help, as a usage error does.
        shows_help = type(exc).__name__ == "NoArgsIsHelpError"
        context = getattr(exc, "ctx", None)
        if _wants_json(argv) and not shows_help:
            command = context.command_path if context is not None else "meterline"
            message = exc.format_message()  # type: ignore[attr-defined]
            sys.stderr.write(error_document("usage", message, {"command": command}) + "\n")
        else:
            exc.show()  # type: ignore[attr-defined]
        sys.exit(EXIT_USAGE)
    except ClickException as exc:
        exc.show()  # type: ignore[attr-defined]
        sys.exit(getattr(exc, "exit_code", EXIT_ERROR))
    except typer.Abort:
        sys.stderr.write("error: aborted\n")
        sys.exit(EXIT_ERROR)
    sys.exit(status if isinstance(status, int) else EXIT_OK)
