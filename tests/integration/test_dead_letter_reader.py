"""services.aggregator.dead_letters.DeadLetterReader against a real broker: one consumer kept for
many listings answers what a fresh list_dead_letters answers, new letters and the `replay dlq`
offsets included."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from services.aggregator.dead_letters import DeadLetterReader, list_dead_letters
from services.aggregator.dlq_replay import replay_dead_letters
from shared.settings import Settings
from shared.topics import ensure_topics
from tests.aggregator_support import envelope_bytes, event
from tests.console_support import produce_dead_letter


def _letter(settings: Settings, organization_id: uuid.UUID, code: str = "unknown_reference") -> str:
    payload = envelope_bytes(
        organization_id, [event(f"e-{uuid.uuid4()}", timestamp=datetime.now(UTC))]
    )
    partition, offset = produce_dead_letter(
        settings.kafka_bootstrap_servers, settings.dlq_topic, payload,
        organization_id=organization_id, code=code,
    )  # fmt: skip
    return f"{partition}:{offset}"


def test_a_kept_reader_lists_what_a_fresh_one_lists_as_letters_arrive_and_are_replayed(
    make_settings: Callable[..., Settings], topic_prefix: str
) -> None:
    settings = make_settings(topic_prefix=topic_prefix)
    ensure_topics(settings)
    reader = DeadLetterReader(settings)
    try:
        organization_id = uuid.uuid4()
        first = [_letter(settings, organization_id) for _ in range(3)]
        listed = reader.listing(limit=10)
        assert sorted(v.reference for v in listed.letters) == sorted(first)
        assert (listed.retained, listed.pending) == (3, 3)

        second = _letter(settings, organization_id, code="database_rejected")
        again = reader.listing(limit=10)
        fresh = list_dead_letters(settings, limit=10)
        assert [v.reference for v in again.letters] == [v.reference for v in fresh.letters]
        assert second in {v.reference for v in again.letters}
        assert again.by_code == {"unknown_reference": 3, "database_rejected": 1}

        replay_dead_letters(settings)  # commits its offsets: nothing is pending any more
        assert (reader.listing(limit=10).pending, reader.listing(limit=2).retained) == (0, 4)
        assert len(reader.listing(limit=2).letters) == 2
    finally:
        reader.close()
