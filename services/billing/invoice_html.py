"""An invoice as a customer reads it: one self-contained HTML page (`invoices show --html FILE`).

Seller and customer, the period, each line with its quantity, what it is priced at (the unit
price, the package, or the tiers, from the pricing the invoice stored) and its amount, the flat
fee and its prorations, adjustments for late usage, the total and the currency. Pure: values in,
text out. Amounts are minor units shown in the currency's major unit, as Stripe counts them
(two decimals, none for zero-decimal currencies such as JPY, three for BHD and its kind).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from decimal import Decimal

from services.billing.invoices import Invoice, InvoiceLine, ordered_lines
from services.billing.pricing import MeteredPrice
from services.billing.terms import SegmentTerms
from shared.events import decimal_text

# Stripe's zero-decimal and three-decimal currencies; every other one has two decimals.
_ZERO_DECIMAL = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga"}
    | {"pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
)
_THREE_DECIMAL = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})


def exponent(currency: str) -> int:
    currency = currency.lower()
    if currency in _ZERO_DECIMAL:
        return 0
    return 3 if currency in _THREE_DECIMAL else 2


def money(minor: int | Decimal, currency: str) -> str:
    """Minor units as the major unit with its decimals, thousands grouped: 123456 usd ->
    "1,234.56 USD". A fraction of a minor unit (a unit price) keeps its digits."""
    places = exponent(currency)
    major = Decimal(minor).scaleb(-places)
    step = Decimal(1).scaleb(-places)
    shown = major.quantize(step) if major == major.quantize(step) else major.normalize()
    sign = "-" if shown < 0 else ""
    digits = f"{abs(shown):f}"
    whole, _, fraction = digits.partition(".")
    grouped = f"{int(whole):,}"
    return f"{sign}{grouped}{'.' + fraction if fraction else ''} {currency.upper()}"


def quantity(value: Decimal) -> str:
    text = decimal_text(value)
    whole, dot, fraction = text.lstrip("-").partition(".")
    sign = "-" if text.startswith("-") else ""
    return f"{sign}{int(whole):,}{dot}{fraction}"


def price_text(price: MeteredPrice, currency: str) -> str:
    """What one unit costs under this price, in words."""
    included = f" ({quantity(price.included)} included)" if price.included else ""
    if price.model == "per_unit":
        return f"{money(price.unit_amount, currency)} each{included}"
    if price.model == "package":
        return (
            f"{money(price.package_amount, currency)} per {quantity(Decimal(price.package_size))}"
            f" started{included}"
        )
    parts = []
    lower = Decimal(0)
    for tier in price.tiers:
        span = (
            f"{quantity(lower + 1) if lower else '1'} to {quantity(tier.up_to)}"
            if (tier.up_to is not None)
            else f"above {quantity(lower)}"
        )
        part = f"{span}: {money(tier.unit_amount, currency)} each"
        if tier.flat_amount:
            part += f" + {money(tier.flat_amount, currency)}"
        parts.append(part)
        lower = tier.up_to if tier.up_to is not None else lower
    kind = "graduated" if price.model == "graduated" else "volume (all units at one tier)"
    return f"{kind}: " + "; ".join(parts) + included


@dataclass(frozen=True)
class Party:
    name: str
    lines: tuple[str, ...] = ()


def _terms_of(invoice: Invoice, line: InvoiceLine) -> SegmentTerms | None:
    if invoice.pricing is None:
        return None
    for segment in invoice.pricing.segments:
        if segment.start == line.segment_start:
            return segment
    return invoice.pricing.segments[0] if invoice.pricing.segments else None


def _when(moment: object) -> str:
    return str(moment).replace("+00:00", " UTC")


def render_invoice_html(invoice: Invoice, seller: Party, customer: Party) -> str:
    currency = invoice.currency
    e = html.escape
    rows = []
    for line in ordered_lines(invoice):
        if line.kind == "flat":
            what, qty, price = line.description or "Plan fee", "", ""
        elif line.kind == "usage":
            terms = _terms_of(invoice, line)
            metered = terms.price.metered.get(line.metric or "") if terms else None
            what = f"{line.metric}"
            if terms and terms.plan_name:
                what += f" ({terms.plan_name})"
            if line.segment_start and line.segment_end:
                what += f", {_when(line.segment_start)} to {_when(line.segment_end)}"
            qty = f"{quantity(line.quantity)} ({quantity(line.billable_quantity)} billable)"
            price = price_text(metered, currency) if metered else ""
        else:
            what = f"Adjustment: {line.metric}, {line.description}"
            qty = f"{quantity(line.quantity)} ({quantity(line.billable_quantity)} billable)"
            price = "as priced in the adjusted period"
        rows.append(
            "<tr>"
            f"<td>{e(what)}</td>"
            f"<td class='num'>{e(qty)}</td>"
            f"<td>{e(price)}</td>"
            f"<td class='num amount'>{e(money(line.amount, currency))}</td>"
            "</tr>"
        )
    seller_lines = "".join(f"<div>{e(text)}</div>" for text in seller.lines)
    customer_lines = "".join(f"<div>{e(text)}</div>" for text in customer.lines)
    period = e(
        f"Adjustments of {_when(invoice.period_start)}"
        if invoice.is_adjustment_only
        else f"{_when(invoice.period_start)} to {_when(invoice.period_end)}"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Invoice {e(str(invoice.id))}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; width: 100%; margin-top: 1em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.4em; text-align: left; vertical-align: top; }}
.num {{ text-align: right; white-space: nowrap; }}
.parties {{ display: flex; justify-content: space-between; }}
tfoot td {{ font-weight: bold; }}
</style></head>
<body>
<h1>Invoice</h1>
<p>Invoice <span id="invoice-id">{e(str(invoice.id))}</span>, {e(invoice.status)}
{f", Stripe invoice {e(invoice.stripe_invoice_id)}" if invoice.stripe_invoice_id else ""}</p>
<div class="parties">
<div id="seller"><strong>From</strong><div>{e(seller.name)}</div>{seller_lines}</div>
<div id="customer"><strong>Bill to</strong><div>{e(customer.name)}</div>{customer_lines}</div>
</div>
<p id="period">Period: {period}</p>
<table>
<thead><tr><th>Description</th><th class="num">Quantity</th><th>Price</th>
<th class="num">Amount</th></tr></thead>
<tbody>
{"".join(rows)}
</tbody>
<tfoot>
<tr><td colspan="3">Flat fees</td>
<td class="num" id="flat">{e(money(invoice.flat_amount, currency))}</td></tr>
<tr><td colspan="3">Total ({e(currency.upper())})</td>
<td class="num" id="total">{e(money(invoice.total, currency))}</td></tr>
</tfoot>
</table>
</body></html>
"""
