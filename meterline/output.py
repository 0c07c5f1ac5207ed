"""How the CLI speaks: tables for people, JSON for machines, one line on stderr for errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import typer

from shared.errors import MeterlineError

# Exit statuses, the same for every command (the README lists them).
EXIT_OK = 0
#: The command failed; one line on stderr says why (a JSON error document under --json).
EXIT_ERROR = 1
#: The command line itself is wrong: an unknown command or option, a missing or bad value.
EXIT_USAGE = 2
#: The command did its work and found something only a person can resolve (billing run: an
#: unresolved reconciliation mismatch).
EXIT_NEEDS_ATTENTION = 3


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, default=_default, indent=2) + "\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(*headers, show_edge=False, pad_edge=False)
    for row in rows:
        # Text, not a markup string: a cell such as `tokens[model=large]` prints as it is.
        table.add_row(*[Text("" if value is None else str(value)) for value in row])
    # Never cut ids: a terminal too narrow wraps the table, a pipe gets full-width lines.
    console = Console(soft_wrap=True)
    if not console.is_terminal:
        console = Console(soft_wrap=True, width=max(console.width, 250))
    console.print(table)


def error_document(code: str, message: str, details: Any = None) -> str:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return json.dumps({"error": body}, default=_default)


def fail(message: str, *, code: str = "error", as_json: bool = False) -> typer.Exit:
    """Print one line (or a JSON error document) to stderr; return the Exit to raise."""
    if as_json:
        sys.stderr.write(error_document(code, message) + "\n")
    else:
        sys.stderr.write(f"error: {message}\n")
    return typer.Exit(EXIT_ERROR)


@contextmanager
def cli_errors(as_json: bool = False) -> Iterator[None]:
    """Turn our errors, and a database that is down, into one line and exit status 1."""
    from sqlalchemy import exc as sa_exc

    from shared.db import _first_line

    try:
        yield
    except MeterlineError as exc:
        raise fail(exc.message, code=exc.code, as_json=as_json) from None
    except sa_exc.IntegrityError as exc:
        raise fail(
            f"conflicts with existing data: {_first_line(exc)}", code="conflict", as_json=as_json
        ) from None
    except sa_exc.OperationalError as exc:
        raise fail(
            f"database error: {_first_line(exc)}", code="database_unavailable", as_json=as_json
        ) from None
    except sa_exc.ProgrammingError as exc:
        raise fail(
            f"database is not migrated or refused the query ({_first_line(exc)}); "
            "run `meterline db upgrade`",
            code="database_error",
            as_json=as_json,
        ) from None


def run_guarded(func: Callable[[], Any], as_json: bool = False) -> Any:
    with cli_errors(as_json):
        return func()
