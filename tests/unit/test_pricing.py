"""Pricing rules of DESIGN.md section 5: hand-computed examples and properties over any quantity."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction
from typing import Any

from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from services.billing.pricing import (
    MeteredPrice,
    PlanPrice,
    Tier,
    exact_amount,
    invoice_total,
    price_metric,
    price_period,
    round_amount,
)
from services.billing.schemas import plan_price

D = Decimal
API_CALLS = MeteredPrice(
    model="graduated",
    included=D(100000),
    tiers=(Tier(D(1000000), D("0.05")), Tier(None, D("0.02"), 500)),
)
SEATS = MeteredPrice(
    model="volume", tiers=(Tier(D(10), D(800)), Tier(None, D(600))), aggregation="max"
)


def test_per_unit_multiplies_billable_by_unit_amount() -> None:
    line = price_metric(
        "storage_gb", D("3.5"), MeteredPrice(model="per_unit", unit_amount=D("12.5"))
    )
    assert (line.billable_quantity, line.amount) == (D("3.5"), 44)  # 43.75 -> 44


def test_included_quantity_is_free() -> None:
    price = MeteredPrice(model="per_unit", included=D(10), unit_amount=D(3))
    assert price_metric("m", D(8), price).amount == 0
    assert price_metric("m", D(8), price).billable_quantity == 0
    assert price_metric("m", D(15), price).amount == 15


def test_package_charges_each_started_package() -> None:
    price = MeteredPrice(model="package", included=D(10), package_size=100, package_amount=200)
    assert price_metric("exports", D(10), price).amount == 0
    assert price_metric("exports", D(11), price).amount == 200
    assert price_metric("exports", D(110), price).amount == 200
    assert price_metric("exports", D(111), price).amount == 400


def test_graduated_prices_each_unit_in_its_tier_plus_reached_flat_amounts() -> None:
    # 2,100,000 calls - 100,000 included = 2,000,000 billable:
    # 1,000,000 x 0.05 = 50,000; 1,000,000 x 0.02 = 20,000; second tier reached: +500.
    assert price_metric("api_calls", D(2100000), API_CALLS).amount == 70500
    # 600,000 billable stays in the first tier: 30,000, no flat amount.
    assert price_metric("api_calls", D(700000), API_CALLS).amount == 30000
    # Exactly at the boundary: the second tier is not reached.
    assert price_metric("api_calls", D(1100000), API_CALLS).amount == 50000
    assert price_metric("api_calls", D(1100001), API_CALLS).amount == 50500  # 50000.02 + 500


def test_volume_prices_every_unit_at_the_tier_of_the_whole_quantity() -> None:
    assert price_metric("seats", D(10), SEATS).amount == 8000
    assert price_metric("seats", D(11), SEATS).amount == 6600
    flat = MeteredPrice(model="volume", tiers=(Tier(D(5), D(1), 100), Tier(None, D(2), 1000)))
    assert price_metric("m", D(3), flat).amount == 103
    assert price_metric("m", D(6), flat).amount == 1012


def test_zero_billable_costs_nothing_even_with_flat_tiers() -> None:
    flat = MeteredPrice(model="volume", tiers=(Tier(None, D(1), 999),))
    assert price_metric("m", D(0), flat).amount == 0
    assert price_metric("m", D(0), API_CALLS).amount == 0


def test_rounding_is_half_up_once_per_line() -> None:
    assert round_amount(D("0.5")) == 1
    assert round_amount(D("1.49999")) == 1
    assert round_amount(D("2.5")) == 3
    # Three tiny tier amounts (0.4 each) round once to 1, not three times to 0.
    price = MeteredPrice(
        model="graduated", tiers=(Tier(D(1), D("0.4")), Tier(D(2), D("0.4")), Tier(None, D("0.4")))
    )
    assert price_metric("m", D(3), price).amount == 1


def test_invoice_total_is_flat_fee_plus_rounded_lines_for_a_yearly_plan() -> None:
    features = {
        "metered": {
            "storage_gb": {"included": 0, "model": "per_unit", "unit_amount": "12.5"},
            "exports": {
                "included": 10,
                "model": "package",
                "package_size": 100,
                "package_amount": 200,
            },
        }
    }
    yearly = plan_price(features, flat_amount=99000)
    lines = price_period(yearly, {"storage_gb": D("0.1"), "exports": D(250)})
    assert [(line.metric, line.amount) for line in lines] == [("exports", 600), ("storage_gb", 1)]
    assert invoice_total(yearly.flat_amount, lines) == 99601


def test_a_plan_metric_without_usage_gets_a_zero_line() -> None:
    plan = PlanPrice(flat_amount=0, metered={"seats": SEATS})
    assert [(line.metric, line.quantity, line.amount) for line in price_period(plan, {})] == [
        ("seats", D(0), 0)
    ]


quantities = st.decimals(
    min_value=0, max_value=10**9, places=3, allow_nan=False, allow_infinity=False
)
unit_amounts = st.decimals(
    min_value=0, max_value=10**4, places=4, allow_nan=False, allow_infinity=False
)


@st.composite
def tiered(draw: st.DrawFn) -> tuple[Tier, ...]:
    bounds = sorted(set(draw(st.lists(st.integers(1, 10**6), max_size=4))))
    tiers = [Tier(D(b), draw(unit_amounts), draw(st.integers(0, 10**5))) for b in bounds]
    return (*tiers, Tier(None, draw(unit_amounts), draw(st.integers(0, 10**5))))


ALL_MODELS = ("per_unit", "package", "graduated", "volume")


@st.composite
def prices(draw: st.DrawFn, models: tuple[str, ...] = ALL_MODELS) -> MeteredPrice:
    model = draw(st.sampled_from(models))
    included = D(draw(st.integers(0, 1000)))
    if model == "per_unit":
        return MeteredPrice(model=model, included=included, unit_amount=draw(unit_amounts))
    if model == "package":
        return MeteredPrice(
            model=model,
            included=included,
            package_size=draw(st.integers(1, 1000)),
            package_amount=draw(st.integers(0, 10**5)),
        )
    return MeteredPrice(model=model, included=included, tiers=draw(tiered()))


@given(quantity=quantities, unit=unit_amounts, flat=st.integers(0, 10**5))
def test_graduated_and_volume_agree_on_a_single_tier(
    quantity: Decimal, unit: Decimal, flat: int
) -> None:
    tiers = (Tier(None, unit, flat),)
    graduated = price_metric("m", quantity, MeteredPrice(model="graduated", tiers=tiers))
    volume = price_metric("m", quantity, MeteredPrice(model="volume", tiers=tiers))
    assert graduated.amount == volume.amount


# Volume pricing is left out on purpose: its total may fall when the whole quantity reaches a
# cheaper tier (11 seats at 600 cost less than 10 at 800), which is what volume pricing means.
@given(
    price=prices(models=("per_unit", "package", "graduated")),
    quantity=quantities,
    growth=quantities,
)
def test_a_total_never_decreases_when_usage_grows(
    price: MeteredPrice, quantity: Decimal, growth: Decimal
) -> None:
    before = price_metric("m", quantity, price).amount
    after = price_metric("m", quantity + growth, price).amount
    assert after >= before


@given(price=prices(), quantity=quantities)
def test_a_line_is_its_exact_amount_rounded_once(price: MeteredPrice, quantity: Decimal) -> None:
    line = price_metric("m", quantity, price)
    exact = exact_amount(line.billable_quantity, price)
    assert isinstance(line.amount, int)
    assert abs(D(line.amount) - exact) <= D("0.5")
    assert line.amount == int((exact + D("0.5")).to_integral_value(rounding="ROUND_FLOOR"))


@given(price=prices(), quantity=quantities)
def test_billable_quantity_is_usage_beyond_included(price: MeteredPrice, quantity: Decimal) -> None:
    line = price_metric("m", quantity, price)
    assert line.billable_quantity == max(D(0), quantity - price.included)


def test_an_amount_just_under_a_half_is_not_rounded_twice() -> None:
    # 29 significant digits: the default 28-digit context would make it 0.5, then round it to 1.
    price = MeteredPrice(model="per_unit", unit_amount=D("0.49999999999999999999999999999"))
    assert price_metric("m", D(1), price).amount == 0
    graduated = MeteredPrice(
        model="graduated",
        tiers=(Tier(D(1), D("0.2")), Tier(None, D("0.29999999999999999999999999999"))),
    )
    assert price_metric("m", D(2), graduated).amount == 0


# An independent oracle: DESIGN.md section 5 applied unit by unit, in exact fractions, with a
# plain loop. It shares no code with services.billing.pricing (only builds its inputs).


def _oracle_round(amount: Fraction) -> int:
    return math.floor(amount + Fraction(1, 2))


def _oracle(
    model: str,
    quantity: int,
    included: int,
    unit: str,
    package: tuple[int, int],
    tiers: list[tuple[int | None, str, int]],
) -> int:
    billable = max(0, quantity - included)
    total = Fraction(0)
    if model == "per_unit":
        for _ in range(billable):
            total += Fraction(unit)
    elif model == "package":
        size, amount = package
        for n in range(billable):
            if n % size == 0:  # the first unit of each package starts it
                total += amount
    elif model == "graduated":
        reached: set[int] = set()
        for n in range(1, billable + 1):
            index = next(i for i, (up_to, _, _) in enumerate(tiers) if up_to is None or n <= up_to)
            total += Fraction(tiers[index][1])
            reached.add(index)
        total += sum(tiers[i][2] for i in reached)
    elif billable > 0:  # volume
        _, unit_amount, flat = next(t for t in tiers if t[0] is None or billable <= t[0])
        for _ in range(billable):
            total += Fraction(unit_amount)
        total += flat
    return _oracle_round(total)


# Up to 30 significant digits, so a line's sum needs more than the default 28-digit context,
# and amounts a hair under a half, where rounding in that context would round the line twice.
exact_units = st.one_of(
    st.decimals(min_value=0, max_value=1000, places=26).map(str),
    st.sampled_from(["0.49999999999999999999999999999", "12.4999999999999999999999999999"]),
)


@st.composite
def oracle_cases(draw: st.DrawFn) -> dict[str, Any]:
    bounds = sorted(set(draw(st.lists(st.integers(1, 3000), max_size=4))))
    tiers: list[tuple[int | None, str, int]] = [
        (bound, draw(exact_units), draw(st.integers(0, 1000))) for bound in [*bounds, None]
    ]
    return {
        "model": draw(st.sampled_from(ALL_MODELS)),
        "quantity": draw(st.integers(0, 3000)),
        "included": draw(st.integers(0, 300)),
        "unit": draw(exact_units),
        "package": (draw(st.integers(1, 500)), draw(st.integers(0, 10**5))),
        "tiers": tiers,
    }


@hypothesis_settings(max_examples=200, deadline=None)
@given(case=oracle_cases())
def test_pricing_matches_a_unit_by_unit_oracle(case: dict[str, Any]) -> None:
    size, amount = case["package"]
    price = MeteredPrice(
        model=case["model"],
        included=D(case["included"]),
        unit_amount=D(case["unit"]),
        package_size=size,
        package_amount=amount,
        tiers=tuple(
            Tier(None if up_to is None else D(up_to), D(unit), flat)
            for up_to, unit, flat in case["tiers"]
        ),
    )

    line = price_metric("m", D(case["quantity"]), price)

    assert line.amount == _oracle(**case)
