"""Plan file validation: every bad field is named by its path, floats never reach a price."""

from __future__ import annotations

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
