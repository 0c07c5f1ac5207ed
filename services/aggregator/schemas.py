"""The dead-letter record: what the aggregator writes to the DLQ topic and `replay dlq` reads back.

Value: JSON {"v": 1, "code", "reason", "retryable", "source": {"topic", "partition", "offset",
"timestamp_ms"}, "payload": base64 of the bytes to re-publish, "failed_at", "event_ids"}; the
code and reason are also headers, so a console consumer shows why without decoding the value.

Coalesced: the letters about events of one source record with one code are one DLQ record whose
payload is the envelope of those events (a storm of conflicting duplicates costs one record per
request, not one per event); `event_ids` lists them (empty when the whole record is refused).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import msgspec

from services.aggregator.batch import DeadLetter, envelope_of

DLQ_VERSION = 1
# A coalesced reason lists each event's reason up to this length; the header keeps 512.
MAX_REASON_CHARACTERS = 4000
# The events of one record are split into several DLQ records past this many envelope bytes, so a
# record (its payload in base64, 4/3) stays under the broker's default message.max.bytes (1 MB).
MAX_PAYLOAD_BYTES = 512 * 1024


class DeadLetterSource(msgspec.Struct, frozen=True):
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None


class DeadLetterRecord(msgspec.Struct, frozen=True, kw_only=True):
    v: int
    code: str
    reason: str
    retryable: bool
    source: DeadLetterSource
    payload: str
    failed_at: datetime
    event_ids: list[str] = msgspec.field(default_factory=list)

    def payload_bytes(self) -> bytes:
        return base64.b64decode(self.payload)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(DeadLetterRecord)


@dataclass(frozen=True, slots=True)
class DeadLetterMessage:
    """One DLQ record, ready to send: key (the source record's), value and headers."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    code: str
    letters: int  # how many dead letters (events, or one whole record) it carries
    partition: int  # of the source record
    offset: int
    reason: str


def dead_letter_messages(
    letters: Sequence[DeadLetter], failed_at: datetime
) -> list[DeadLetterMessage]:
    """The DLQ records of a batch's dead letters, coalesced per source record and code."""
    groups: dict[tuple[object, ...], list[DeadLetter]] = {}
    for index, letter in enumerate(letters):
        source = letter.source
        # Letters about events of one record merge; a letter about a whole record stands alone.
        alone = index if letter.event is None else None
        key = (source.topic, source.partition, source.offset, letter.code, alone)
        groups.setdefault(key, []).append(letter)
    return [
        _message(part, payload, failed_at)
        for group in groups.values()
        for part, payload in _parts(group)
    ]


def _parts(group: list[DeadLetter]) -> list[tuple[list[DeadLetter], bytes]]:
    """The group with the payload to re-publish, halved until each payload fits."""
    if group[0].event is None:
        return [(group, group[0].payload)]
    payload = envelope_of([letter.event for letter in group if letter.event is not None])
    if len(payload) <= MAX_PAYLOAD_BYTES or len(group) == 1:
        return [(group, payload)]
    half = len(group) // 2
    return _parts(group[:half]) + _parts(group[half:])


def _message(group: list[DeadLetter], payload: bytes, failed_at: datetime) -> DeadLetterMessage:
    first = group[0]
    events = [letter.event for letter in group if letter.event is not None]
    reason = first.reason
    if len(group) > 1:
        reason = f"{len(group)} events of this record: " + "; ".join(g.reason for g in group)
        if len(reason) > MAX_REASON_CHARACTERS:
            reason = reason[: MAX_REASON_CHARACTERS - 1] + "…"
    source = first.source
    record = DeadLetterRecord(
        v=DLQ_VERSION,
        code=first.code,
        reason=reason,
        retryable=first.retryable,
        source=DeadLetterSource(source.topic, source.partition, source.offset, source.timestamp_ms),
        payload=base64.b64encode(payload).decode(),
        failed_at=failed_at,
        event_ids=[e.event.id for e in events],
    )
    return DeadLetterMessage(
        key=source.key,
        value=_encoder.encode(record),
        headers=[
            ("meterline-dlq-code", first.code.encode()),
            ("meterline-dlq-reason", reason[:512].encode()),
        ],
        code=first.code,
        letters=len(group),
        partition=source.partition,
        offset=source.offset,
        reason=reason,
    )


def decode_dead_letter(data: bytes) -> DeadLetterRecord:
    """Raises msgspec.DecodeError (a ValueError) when the bytes are not a dead-letter record."""
    return _decoder.decode(data)
