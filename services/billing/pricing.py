"""Pricing: plan prices and a period's quantities in, rounded line amounts out (DESIGN.md 5).

Pure functions over Decimal and int minor units: no session, no clock, no floats. Every product
and sum is taken in shared.events.SUM_CONTEXT (80 digits), never the default 28: quantities have
at most 25 significant digits and unit amounts are exact decimal strings, so the amount before
the one rounding per line is exact, and that rounding is the only one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal, localcontext
from typing import Literal

from shared.events import SUM_CONTEXT

MinorUnits = int
Quantity = Decimal
PriceModel = Literal["per_unit", "package", "graduated", "volume"]
Aggregation = Literal["sum", "max"]

ZERO = Decimal(0)


@dataclass(frozen=True)
class Tier:
    """Units in (previous up_to, up_to] cost unit_amount each; up_to None is the open last tier."""

    up_to: Decimal | None
    unit_amount: Decimal = ZERO
    flat_amount: MinorUnits = 0


Match = tuple[tuple[str, str], ...]
"""A filter's dimension values, sorted by name: an event matches when it carries every one."""


@dataclass(frozen=True)
class PricedFilter:
    """The dimension filter a price of a metered metric applies to: `match` (None: the default,
    for the values no filter names) among `filters`, every filter of that metric's price in
    order (an event's values go to the first filter they match)."""

    metric: str
    match: Match | None
    filters: tuple[Match, ...]

    def takes(self, values: dict[str, str | None] | dict[str, str]) -> bool:
        """Whether dimension values are priced by this filter."""
        first = next((f for f in self.filters if all(values.get(k) == v for k, v in f)), None)
        return first == self.match


@dataclass(frozen=True)
class MeteredPrice:
    model: PriceModel
    included: Decimal = ZERO
    unit_amount: Decimal = ZERO
    package_size: int = 1
    package_amount: MinorUnits = 0
    tiers: tuple[Tier, ...] = ()
    aggregation: Aggregation = "sum"
    stripe_meter: str | None = None
    # Set on a price per dimension filter (its line's metric is then filter_label(...)).
    priced_filter: PricedFilter | None = None


def filter_label(metric: str, match: Match | None) -> str:
    """The line name of one priced filter: `tokens[model=large,type=input]`, and
    `tokens[other]` for the default (filter names and values hold no `,=[]`, so it is unique)."""
    if match is None:
        return f"{metric}[other]"
    return metric + "[" + ",".join(f"{k}={v}" for k, v in match) + "]"


@dataclass(frozen=True)
class PricedLine:
    metric: str
    quantity: Quantity
    billable_quantity: Quantity
    amount: MinorUnits


@dataclass(frozen=True)
class PlanPrice:
    """What an invoice needs from a plan: the flat fee for its interval and the metered prices."""

    flat_amount: MinorUnits
    metered: dict[str, MeteredPrice] = field(default_factory=dict)


def billable_quantity(quantity: Quantity, price: MeteredPrice) -> Quantity:
    return max(ZERO, SUM_CONTEXT.subtract(quantity, price.included))


def exact_amount(billable: Quantity, price: MeteredPrice) -> Decimal:
    """The unrounded amount in minor units for a billable quantity; 0 costs 0 in every model.

    Every operation names SUM_CONTEXT itself rather than entering it as the local context: the
    same arithmetic, without a context switch per line (it cost a quarter of pricing)."""
    if billable <= 0:
        return ZERO
    if price.model == "per_unit":
        return SUM_CONTEXT.multiply(billable, price.unit_amount)
    if price.model == "package":
        packages = SUM_CONTEXT.divide(billable, Decimal(price.package_size)).to_integral_value(
            ROUND_CEILING, context=SUM_CONTEXT
        )
        return SUM_CONTEXT.multiply(packages, price.package_amount)
    if price.model == "graduated":
        return _graduated(billable, price.tiers)
    return _volume(billable, price.tiers)


def _graduated(billable: Quantity, tiers: Sequence[Tier]) -> Decimal:
    total = ZERO
    lower = ZERO
    for tier in tiers:
        upper = billable if tier.up_to is None else min(billable, tier.up_to)
        if upper > lower:
            tier_amount = SUM_CONTEXT.multiply(SUM_CONTEXT.subtract(upper, lower), tier.unit_amount)
            total = SUM_CONTEXT.add(total, SUM_CONTEXT.add(tier_amount, tier.flat_amount))
        if tier.up_to is None or billable <= tier.up_to:
            break
        lower = tier.up_to
    return total


def _volume(billable: Quantity, tiers: Sequence[Tier]) -> Decimal:
    for tier in tiers:
        if tier.up_to is None or billable <= tier.up_to:
            return SUM_CONTEXT.add(
                SUM_CONTEXT.multiply(billable, tier.unit_amount), tier.flat_amount
            )
    raise ValueError("tiers must end with an open tier (up_to null)")


def round_amount(amount: Decimal) -> MinorUnits:
    """The one rounding of a line: half up to an integer number of minor units."""
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_UP, context=SUM_CONTEXT))


def prorated(amount: MinorUnits, part: timedelta, whole: timedelta) -> MinorUnits:
    """`amount` for `part` of a period of length `whole`, the way Stripe prorates a fee: by the
    time (Stripe counts seconds; this is exact to the microsecond, and whole seconds give the
    same), rounded once, half up."""
    if whole <= timedelta(0) or part <= timedelta(0):
        return 0
    part = min(part, whole)
    tick = timedelta(microseconds=1)
    with localcontext(SUM_CONTEXT):
        return round_amount(Decimal(amount) * Decimal(part // tick) / Decimal(whole // tick))


def price_metric(metric: str, quantity: Quantity, price: MeteredPrice) -> PricedLine:
    billable = billable_quantity(quantity, price)
    return PricedLine(
        metric=metric,
        quantity=quantity,
        billable_quantity=billable,
        amount=round_amount(exact_amount(billable, price)),
    )


def price_period(plan: PlanPrice, quantities: dict[str, Quantity]) -> list[PricedLine]:
    """One line per metered metric of the plan, in metric order; a metric with no usage is 0."""
    return [
        price_metric(metric, quantities.get(metric, ZERO), price)
        for metric, price in sorted(plan.metered.items())
    ]


def invoice_total(flat_amount: MinorUnits, lines: Sequence[PricedLine]) -> MinorUnits:
    return flat_amount + sum(line.amount for line in lines)
