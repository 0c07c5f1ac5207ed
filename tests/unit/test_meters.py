"""Meter files are validated with errors naming each field's path; the pure core of meter windows
keeps every aggregation so that windows merge, in any order and grouping, into what the events
give directly."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.aggregator.batch import CountableEvent, SourceRecord
from services.aggregator.meter_windows import meter_usage
from shared.errors import InvalidInput
from shared.events import UsageEvent, window_start
from shared.meter_usage import MeterTotal
from shared.meters import (
    MeterDefinition,
    check_meter_properties,
    dimensions_key,
    parse_meter_text,
)

ORG = uuid.UUID("00000000-0000-0000-0000-000000000001")
T0 = datetime(2026, 11, 2, tzinfo=UTC)
SOURCE = SourceRecord("t", 0, 0, None, None, b"")


def test_the_issue_example_file_reads_as_three_meters() -> None:
    meters = parse_meter_text(
        """
        meters:
          - {metric: tokens, aggregation: sum, dimensions: [model, type]}
          - {metric: active_users, aggregation: unique_count, property: user_id}
          - {metric: storage_gb, aggregation: latest}
        """,
        source="meters.yaml",
    )
    assert meters == [
        MeterDefinition("tokens", "sum", ("model", "type")),
        MeterDefinition("active_users", "unique_count", (), property="user_id"),
        MeterDefinition("storage_gb", "latest"),
    ]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('{"meters": [{"metric": "a", "aggregation": "sum"}, {"metric": "b", '
         '"aggregation": "median"}]}', "meters[1].aggregation"),
        ('{"meters": [{"metric": "Bad Name", "aggregation": "sum"}]}', "meters[0].metric"),
        ('{"meters": [{"metric": "u", "aggregation": "unique_count"}]}', "meters[0].property"),
        ('{"meters": [{"metric": "s", "aggregation": "sum", "property": "x"}]}',
         "meters[0].property"),
        ('{"meters": [{"metric": "s", "dimensions": ["a", "a"]}]}', "meters[0].dimensions[1]"),
        ('{"meters": [{"metric": "s", "dimensions": "model"}]}', "meters[0].dimensions"),
        ('{"meters": [{"metric": "s", "colour": "red"}]}', "meters[0].colour"),
        ('{"meters": [{"metric": "s"}, {"metric": "s"}]}', "meters[1].metric"),
        ('{"meters": [{"metric": "s", "value_property": ""}]}', "meters[0].value_property"),
        ('{"meters": {"metric": "s"}}', "meters"),
    ],
)  # fmt: skip
def test_a_bad_meter_file_is_refused_naming_the_field_path(text: str, named: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_meter_text(text, source="m.json", as_json=True)
    assert f"{named}:" in refused.value.message


def test_an_event_of_a_meter_lacking_a_dimension_or_the_counted_property_is_named() -> None:
    meters = {
        "tokens": MeterDefinition("tokens", "sum", ("model", "type")),
        "users": MeterDefinition("users", "unique_count", ("region",), property="user_id"),
    }
    problems = check_meter_properties(
        [
            ("tokens", {"model": "large", "type": "input"}),
            ("tokens", {"model": "large"}),
            ("users", {"region": "eu"}),
            ("plain", {}),
        ],
        meters,
    )
    assert [p["index"] for p in problems] == [1, 2]
    assert "type" in problems[0]["reason"] and "user_id" in problems[1]["reason"]


def test_dimension_values_have_one_spelling_whatever_their_order() -> None:
    assert dimensions_key({"type": "in", "model": "l"}) == dimensions_key(
        {"model": "l", "type": "in"}
    )


def countable(event_id: str, quantity: Decimal, at: datetime, **properties: str) -> CountableEvent:
    usage = UsageEvent(
        id=event_id, metric="m", quantity=quantity, timestamp=at, properties=properties
    )
    return CountableEvent(ORG, None, at, usage, b"", window_start(at, 3600), SOURCE)


event_lists = st.lists(
    st.tuples(
        st.integers(0, 7200),  # seconds after T0: two windows
        st.decimals(0, 1000, places=2),
        st.sampled_from(["a", "b"]),  # region
        st.sampled_from(["u1", "u2", "u3"]),  # user
    ),
    min_size=1,
    max_size=40,
)


@given(event_lists, st.integers(1, 5))
def test_windows_merged_in_any_grouping_equal_the_aggregations_of_the_events(
    raw: list[tuple[int, Decimal, str, str]], split: int
) -> None:
    meter = MeterDefinition("m", "unique_count", ("region",), property="user")
    events = [
        countable(f"e{i}", q, T0 + timedelta(seconds=s // 2 * 2), region=r, user=u)
        for i, (s, q, r, u) in enumerate(raw)
    ]
    whole = meter_usage(events, {"m": meter})
    # The same events in batches, merged as the upsert merges them.
    merged: dict[object, MeterTotal] = {}
    values: set[object] = set()
    for part in range(split):
        usage = meter_usage(events[part::split], {"m": meter})
        for key, total in usage.windows.items():
            merged[key] = total if key not in merged else merged[key].merge(total)
        values |= usage.values
    assert merged == whole.windows
    assert values == whole.values
    for key, total in whole.windows.items():
        mine = [e for e in events
                if (e.window_start, dimensions_key({"region": e.event.properties["region"]}))
                == (key[5], key[4])]  # fmt: skip
        quantities = [e.event.quantity for e in mine]
        assert total.quantity == sum(quantities, Decimal(0))
        assert total.event_count == len(mine)
        assert (total.max_quantity, total.min_quantity) == (max(quantities), min(quantities))
        latest = max(mine, key=lambda e: (e.event.timestamp, e.event.id))
        assert (total.latest_quantity, total.latest_event_id) == (
            latest.event.quantity,
            latest.event.id,
        )


def test_latest_of_two_events_at_one_instant_is_the_greater_event_id() -> None:
    a = countable("evt-a", Decimal(7), T0)
    b = countable("evt-b", Decimal(3), T0)
    meter = {"m": MeterDefinition("m", "latest")}
    for order in ([a, b], [b, a]):
        (total,) = meter_usage(order, meter).windows.values()
        assert (total.latest_quantity, total.latest_event_id) == (Decimal(3), "evt-b")
