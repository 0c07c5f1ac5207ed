"""Replay through the in-memory RecordReader against the real database: resends that ingest timed
are one event in its first window, and a topic that keeps less than the horizon is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy.engine import Engine

from services.aggregator.replay import ReplayRequest, replay
from services.aggregator.service import BatchApplier
from services.aggregator.topic_reader import InMemoryTopicReader
from shared.errors import ConfigurationError
from shared.settings import Settings
from tests.aggregator_support import envelope_bytes, event, make_tenant, record, totals, windows

NOW = datetime.now(UTC)
BASE = NOW.replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)


def test_replay_counts_untimed_resends_once_in_the_window_of_the_first(
    engine: Engine, settings: Settings
) -> None:
    tenant = make_tenant(engine)
    org = tenant.organization_id
    reader = InMemoryTopicReader(settings.events_topic, [0])
    # The same five untimed events sent at BASE+10m, resent at BASE+70m and BASE+130m.
    for attempt in range(3):
        received = BASE + timedelta(minutes=10 + 60 * attempt)
        events = [
            event(f"u{i}", quantity=i + 1, timestamp=received, timestamp_defaulted=True)
            for i in range(5)
        ]
        value = envelope_bytes(org, events, received_at=received)
        reader.append(0, value, timestamp_ms=int(received.timestamp() * 1000))
        if attempt == 0:
            BatchApplier(engine, settings).apply([record(value)])
    live = windows(engine, org)

    report = replay(
        engine, settings, reader, ReplayRequest(BASE, BASE + timedelta(hours=3), org), now=NOW
    )

    assert report.events_counted == 5
    assert report.windows_changed == 0
    assert windows(engine, org) == live
    assert totals(engine, org) == (Decimal(15), 5)
    assert [window_start for *_, window_start in live] == [BASE]

    # A range that holds only the resends: the counted version lies before it, so nothing in
    # it counts (a resend matched by fingerprint alone would be counted a second time here).
    later = replay(
        engine, settings, reader, ReplayRequest(BASE + timedelta(hours=1), NOW, org), now=NOW
    )

    assert (later.events_counted, later.windows_changed) == (0, 0)
    assert totals(engine, org) == (Decimal(15), 5)


def test_replay_refuses_a_topic_that_keeps_less_than_the_horizon_naming_the_setting(
    engine: Engine, settings: Settings
) -> None:
    tenant = make_tenant(engine)
    reader = InMemoryTopicReader(settings.events_topic, [0], retention_ms=7 * 24 * 3600 * 1000)

    with pytest.raises(ConfigurationError) as refused:
        request = ReplayRequest(BASE, BASE + timedelta(hours=1), tenant.organization_id)
        replay(engine, settings, reader, request, now=NOW)

    assert "retention.ms" in refused.value.message
    assert "METERLINE_LATENESS_HORIZON_DAYS" in refused.value.message
    assert settings.events_topic in refused.value.message
