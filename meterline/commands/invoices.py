"""`meterline invoices`: list invoices and show one, as JSON or as a customer-readable HTML page."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated

import typer

from meterline.output import cli_errors, print_json, print_table

app = typer.Typer(no_args_is_help=True, help="Invoices and the Stripe invoices that collect them.")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _id(value: str, what: str) -> uuid.UUID:
    from shared.errors import InvalidInput

    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidInput(f"not {what} id: {value!r}") from None


@app.command("list")
def list_(
    organization: Annotated[
        str | None, typer.Option("--org", help="Only this organization (id or slug).")
    ] = None,
    subscription: Annotated[
        str | None, typer.Option("--subscription", help="Only this subscription (id).")
    ] = None,
    status: Annotated[str | None, typer.Option("--status", help="draft or final.")] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many, newest first.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """List invoices, newest period first."""
    with cli_errors(as_json):
        from meterline.commands import context
        from services.billing import invoice_repository
        from services.billing.documents import invoice_summary
        from shared.db import unit_of_work
        from shared.errors import InvalidInput
        from shared.organizations import find_organization

        if status not in (None, "draft", "final"):
            raise InvalidInput(f"--status: {status!r} is not draft or final")
        if not 1 <= limit <= 10_000:
            raise InvalidInput("--limit: must be between 1 and 10000")
        engine = context.engine()
        with unit_of_work(engine) as session:
            org_id = find_organization(session, organization).id if organization else None
        with engine.connect() as connection:
            invoices = invoice_repository.list_invoices(
                connection,
                organization_id=org_id,
                subscription_id=_id(subscription, "a subscription") if subscription else None,
                status=status,
                limit=limit,
            )
        documents = [invoice_summary(invoice) for invoice in invoices]
        if as_json:
            print_json({"invoices": documents})
            return
        print_table(
            ["id", "subscription", "from", "to", "status", "total", "stripe"],
            [
                (d["id"], str(d["subscription_id"])[:8], str(d["period_start"])[:19],
                 str(d["period_end"])[:19], d["status"], f"{d['total']} {d['currency']}",
                 d["stripe_status"] or "")
                for d in documents
            ],
        )  # fmt: skip


@app.command("show")
def show(
    invoice_id: Annotated[str, typer.Argument(help="Invoice id.")],
    html: Annotated[
        Path | None,
        typer.Option("--html", help="Also write the invoice as an HTML page to this file."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """One invoice with its lines; `--html FILE` writes the page a customer reads."""
    with cli_errors(as_json):
        from meterline.commands import context
        from services.billing import invoice_repository
        from services.billing.documents import customer_party, invoice_summary, seller_party
        from services.billing.invoice_html import money, render_invoice_html
        from shared.access import require_organization
        from shared.db import unit_of_work
        from shared.errors import InvalidInput, NotFound

        engine = context.engine()
        with engine.connect() as connection:
            invoice = invoice_repository.invoice_by_id(connection, _id(invoice_id, "an invoice"))
        if invoice is None:
            raise NotFound(f"invoice {invoice_id} not found")
        if html is not None:
            with unit_of_work(engine) as session:
                customer = customer_party(require_organization(session, invoice.organization_id))
            seller = seller_party(context.settings())
            try:
                html.write_text(render_invoice_html(invoice, seller, customer), encoding="utf-8")
            except OSError as exc:
                raise InvalidInput(f"--html: cannot write {html}: {exc.strerror}") from None
        document = invoice_summary(invoice)
        if as_json:
            print_json(document)
            return
        typer.echo(
            f"invoice {invoice.id} ({invoice.status}) for {invoice.period_start.isoformat()} to "
            f"{invoice.period_end.isoformat()}: {money(invoice.total, invoice.currency)}"
        )
        print_table(
            ["kind", "metric", "quantity", "billable", "amount"],
            [
                ("flat", line["description"], "", "", line["amount"])
                for line in document["flat_lines"]  # type: ignore[attr-defined]
            ]
            + [
                (line["kind"], line["metric"], line["quantity"], line["billable_quantity"],
                 line["amount"])
                for line in document["lines"]  # type: ignore[attr-defined]
            ],
        )  # fmt: skip
        if html is not None:
            typer.echo(f"wrote {html}")
