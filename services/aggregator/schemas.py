"""The dead-letter record: what the aggregator writes to the DLQ topic and `replay dlq` reads back.

Value: JSON {"v": 1, "code", "reason", "retryable", "source": {"topic", "partition", "offset",
"timestamp_ms"}, "payload": base64 of the bytes to re-publish, "failed_at"}; the code and reason
are also headers, so a console consumer shows why without decoding the value.
"""

from __future__ import annotations

import base64
from datetime import datetime

import msgspec

from services.aggregator.batch import DeadLetter

DLQ_VERSION = 1


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

    def payload_bytes(self) -> bytes:
        return base64.b64decode(self.payload)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(DeadLetterRecord)


def encode_dead_letter(letter: DeadLetter, failed_at: datetime) -> bytes:
    source = letter.source
    return _encoder.encode(
        DeadLetterRecord(
            v=DLQ_VERSION,
            code=letter.code,
            reason=letter.reason,
            retryable=letter.retryable,
            source=DeadLetterSource(
                source.topic, source.partition, source.offset, source.timestamp_ms
            ),
            payload=base64.b64encode(letter.payload).decode(),
            failed_at=failed_at,
        )
    )


def decode_dead_letter(data: bytes) -> DeadLetterRecord:
    """Raises msgspec.DecodeError (a ValueError) when the bytes are not a dead-letter record."""
    return _decoder.decode(data)


def dead_letter_headers(letter: DeadLetter) -> list[tuple[str, bytes]]:
    return [
        ("meterline-dlq-code", letter.code.encode()),
        ("meterline-dlq-reason", letter.reason[:512].encode()),
    ]
