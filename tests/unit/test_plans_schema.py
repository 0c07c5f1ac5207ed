"""Plan file validation: every bad field is named by its path, floats never reach a price."""

from __future__ import annotations

import pytest

from services.billing.schemas import validate_plan_file
from shared.errors import InvalidInput


def test_a_float_unit_amount_and_a_misplaced_open_tier_are_named_by_path() -> None:
    document = {
        "plans": [
            {"key": "a", "features": {}},
            {
                "key": "b",
                "features": {
                    "metered": {
                        "calls": {"model": "per_unit", "unit_amount": 0.05},
                        "seats": {
                            "model": "volume",
                            "aggregation": "median",
                            "tiers": [{"up_to": None, "unit_amount": "1"}, {"up_to": 5}],
                        },
                    }
                },
            },
        ]
    }
    try:
        validate_plan_file(document)
    except InvalidInput as exc:
        problems = exc.details
    else:
        raise AssertionError("an invalid plan file was accepted")
    assert problems == [
        'plans[1].features.metered.calls.unit_amount: must be a decimal string such as "0.05"',
        "plans[1].features.metered.seats.aggregation: must be sum or max",
        "plans[1].features.metered.seats.tiers[0].up_to: "
        "must be a number; only the last tier is null",
        "plans[1].features.metered.seats.tiers[1].up_to: must be null on the last tier",
    ]


def test_a_price_with_filters_becomes_one_price_per_filter_and_a_default() -> None:
    from services.billing.schemas import validate_features

    prices = validate_features(
        {
            "metered": {
                "tokens": {
                    "model": "per_unit",
                    "unit_amount": "1",
                    "filters": [
                        {"match": {"type": "input", "model": "large"}, "model": "per_unit",
                         "unit_amount": "3", "included": 5},
                        {"match": {"model": "large"}, "model": "per_unit", "unit_amount": "2"},
                    ],
                }
            }
        }
    )  # fmt: skip
    assert sorted(prices) == [
        "tokens[model=large,type=input]",
        "tokens[model=large]",
        "tokens[other]",
    ]
    first = prices["tokens[model=large,type=input]"].priced_filter
    large = prices["tokens[model=large]"].priced_filter
    default = prices["tokens[other]"].priced_filter
    assert first is not None and large is not None and default is not None
    assert first.takes({"model": "large", "type": "input", "region": "eu"})
    assert not first.takes({"model": "large", "type": "output"})
    assert large.takes({"model": "large", "type": "output"})
    assert default.takes({"model": "small", "type": "input"}) and not default.takes(
        {"model": "large"}
    )


@pytest.mark.parametrize(
    ("filters", "named"),
    [
        ([], "tokens.filters"),
        ([{"model": "per_unit", "unit_amount": "1"}], "tokens.filters[0].match"),
        ([{"match": {"m": "a,b"}, "model": "per_unit", "unit_amount": "1"}],
         "tokens.filters[0].match"),
        ([{"match": {"m": "a"}, "model": "tiered"}], "tokens.filters[0].model"),
        ([{"match": {"m": "a"}, "model": "per_unit", "unit_amount": "1", "stripe_meter": "x"}],
         "tokens.filters[0].stripe_meter"),
        ([{"match": {"m": "a"}, "model": "per_unit", "unit_amount": "1"},
          {"match": {"m": "a"}, "model": "per_unit", "unit_amount": "2"}],
         "tokens.filters[1].match"),
    ],
)  # fmt: skip
def test_a_bad_filter_is_refused_naming_its_path(filters: list, named: str) -> None:
    from services.billing.schemas import validate_features

    with pytest.raises(InvalidInput) as refused:
        validate_features(
            {"metered": {"tokens": {"model": "per_unit", "unit_amount": "1", "filters": filters}}}
        )
    assert f"features.metered.{named}" in refused.value.message
