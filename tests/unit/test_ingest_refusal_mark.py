"""Which refusals of the key check put a connection in the front door's strangers' line: a
stranger's (unknown key, its address or the strangers' budget over the limit), never a verified
key's own rate limit or a database outage."""

from __future__ import annotations

import pytest

from services.ingest.api import _stranger_refusal
from services.ingest.keycache import FAILED_FROM_ADDRESS
from services.ingest.service import UNAUTHENTICATED_MESSAGE, KeyOverLimit
from shared.errors import DatabaseUnavailable, MeterlineError, RateLimited, Unauthenticated


@pytest.mark.parametrize(
    ("refusal", "stranger"),
    [
        (Unauthenticated(UNAUTHENTICATED_MESSAGE), True),
        (RateLimited(FAILED_FROM_ADDRESS, retry_after=1.0), True),
        (RateLimited("too many unknown keys are being checked", retry_after=1.0), True),
        (KeyOverLimit("over this key's rate limit", retry_after=1.0), False),
        (DatabaseUnavailable("database down"), False),
    ],
    ids=["unknown key", "address over limit", "strangers budget", "key over its limit", "outage"],
)
def test_only_a_strangers_refusal_marks_the_connection(
    refusal: MeterlineError, stranger: bool
) -> None:
    assert _stranger_refusal(refusal) is stranger
    # The answer is the same 429 either way: only the line differs.
    if isinstance(refusal, RateLimited):
        assert refusal.status == 429
