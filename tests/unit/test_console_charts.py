"""The console's charts: pure SVG from values, every label escaped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from services.console.charts import Series, line_chart

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def test_no_points_is_a_note_not_an_empty_chart() -> None:
    assert "no data in this range" in line_chart([Series("a", [])], title="Usage")


def test_every_series_is_one_line_with_its_name_in_the_legend() -> None:
    points = [(T0 + timedelta(hours=h), Decimal(h)) for h in range(5)]
    chart = str(line_chart([Series("api_calls", points), Series("exports", points)], title="U"))
    assert chart.count("<polyline") == 2
    assert "api_calls" in chart and "exports" in chart


def test_names_and_titles_are_escaped() -> None:
    chart = str(line_chart([Series("<script>", [(T0, Decimal(1))])], title='"><b>'))
    assert "<script>" not in chart and "<b>" not in chart
    assert "&lt;script&gt;" in chart


def test_one_point_is_a_dot() -> None:
    assert "<circle" in str(line_chart([Series("a", [(T0, 3)])], title="U"))


def test_axis_labels_show_exact_values() -> None:
    chart = str(
        line_chart(
            [Series("a", [(T0, Decimal("2500000")), (T0 + timedelta(days=1), 0)])], title="U"
        )
    )
    assert ">2.5M<" in chart
