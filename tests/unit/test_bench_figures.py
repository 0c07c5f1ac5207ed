"""The `BENCH {json}` line `make bench` ends with: figures of one run and their ratios."""

from __future__ import annotations

import json

import pytest

from tests.bench import figures


@pytest.fixture(autouse=True)
def fresh_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(figures, "_measured", {})


def parsed() -> dict[str, float]:
    line = figures.bench_line()
    assert line.startswith("BENCH ")
    return json.loads(line.removeprefix("BENCH "))


def test_ratios_come_from_the_figures_of_the_same_run() -> None:
    figures.record(ingest_events_per_s=50_000, ingest_requests_per_s=500)
    figures.record(raw_producer_records_per_s=2_000, aggregator_events_per_s=12_500)
    figures.record(e2e_events_per_s=10_000)

    line = parsed()

    assert line["ingest_per_raw"] == 0.25
    assert line["aggregator_per_ingest"] == 0.25
    assert line["e2e_per_ingest"] == 0.2
    assert line["ingest_events_per_s"] == 50_000


def test_a_ratio_missing_a_side_is_left_out_and_a_later_figure_replaces_an_earlier() -> None:
    figures.record(aggregator_events_per_s=10_000, e2e_events_per_s=1.0)
    figures.record(e2e_events_per_s=8_000)

    line = parsed()

    assert "aggregator_per_ingest" not in line
    assert "e2e_per_ingest" not in line
    assert line["e2e_events_per_s"] == 8_000


def test_a_zero_denominator_leaves_the_ratio_out() -> None:
    figures.record(aggregator1_events_per_s=2_000, ingest1_events_per_s=0)

    assert "aggregator1_per_ingest1" not in parsed()


def test_shares_keep_three_decimals_and_rates_one() -> None:
    figures.record(batch1_python_share=0.2634, ingest_events_per_s=49_962.46)

    line = parsed()

    assert line["batch1_python_share"] == 0.263
    assert line["ingest_events_per_s"] == 49_962.5
