"""The demo reports what its own run added: a repeat run's figures leave earlier runs' usage in
the same hours out, and any surplus or shortfall is named."""

from __future__ import annotations

from decimal import Decimal

from meterline.commands.demo import Expected, Tally, added_since, differences


def _accepted(events: int, quantity: str) -> Expected:
    expected = Expected()
    for _ in range(events):
        expected.add("acme", "exports", Decimal(quantity))
    return expected


def test_a_repeat_run_counts_only_what_it_added_on_top_of_an_earlier_run() -> None:
    expected = _accepted(800, "3")
    earlier = {("acme", "exports"): Tally(Decimal(2400), 800)}
    after = {("acme", "exports"): Tally(Decimal(4800), 1600)}

    added = added_since(earlier, after)

    assert added == {("acme", "exports"): Tally(Decimal(2400), 800)}
    assert differences(expected, added) == []
    assert expected.events == {"acme": 800}


def test_a_surplus_is_named_even_for_a_metric_this_run_did_not_send() -> None:
    expected = _accepted(2, "0.5")
    before = {("acme", "api_calls"): Tally(Decimal(5), 5)}
    after = {
        ("acme", "exports"): Tally(Decimal("1.5"), 3),
        ("acme", "api_calls"): Tally(Decimal(6), 6),
    }

    assert differences(expected, added_since(before, after)) == [
        "acme api_calls: accepted 0 events (0), counted 1 (1)",
        "acme exports: accepted 2 events (1.0), counted 3 (1.5)",
    ]


def test_nothing_counted_yet_is_a_shortfall() -> None:
    assert differences(_accepted(1, "1"), {}) == [
        "acme exports: accepted 1 events (1), counted 0 (0)"
    ]
