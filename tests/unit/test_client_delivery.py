"""The client's delivery rules, without I/O: what each answer of the service does to a batch."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections import deque
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from meterline_client.delivery import (
    MAX_BATCH_BYTES,
    Delivery,
    RetryPolicy,
    batch_body,
    retry_after_seconds,
    take_batch,
)
from meterline_client.events import PendingEvent, make_event, quantity_text

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
NO_JITTER = RetryPolicy(attempts=3, base_delay=0.0, max_delay=0.0)


def events(n: int) -> list[PendingEvent]:
    return [make_event("api_calls", timestamp=NOW, event_id=f"e{i}") for i in range(n)]


def sent_ids(body: bytes) -> list[str]:
    return [e["id"] for e in json.loads(body)["events"]]


def rejection(*indexes: int, status: int = 422) -> tuple[int, dict[str, str], bytes]:
    details = [{"index": i, "reason": f"bad {i}"} for i in indexes]
    body = {"error": {"code": "invalid", "message": "invalid", "details": details}}
    return status, {}, json.dumps(body).encode()


def test_a_422_drops_only_the_named_events_and_sends_the_rest_at_once() -> None:
    delivery = Delivery(events(4), NO_JITTER)
    assert sent_ids(delivery.next_body() or b"") == ["e0", "e1", "e2", "e3"]
    assert delivery.answered(*rejection(1, 3)) == 0.0
    assert sent_ids(delivery.next_body() or b"") == ["e0", "e2"]
    delivery.answered(202, {}, b'{"accepted": 2}')
    assert delivery.next_body() is None
    assert (delivery.accepted, [r.id for r in delivery.rejected]) == (2, ["e1", "e3"])
    assert delivery.rejected[0].reason == "bad 1" and delivery.rejected[0].event["id"] == "e1"
    assert delivery.unsent == [] and delivery.error is None


def test_a_403_naming_events_drops_them_like_a_422() -> None:
    delivery = Delivery(events(2), NO_JITTER)
    delivery.answered(*rejection(0, status=403))
    delivery.answered(202, {}, b"")
    assert [(r.id, r.status) for r in delivery.rejected] == [("e0", 403)]
    assert delivery.accepted == 1


def test_a_422_naming_no_event_is_bisected_until_the_culprit_is_alone() -> None:
    delivery = Delivery(events(4), NO_JITTER)
    culprit = "e2"
    while (body := delivery.next_body()) is not None:
        ids = sent_ids(body)
        if culprit in ids:
            delivery.answered(422, {}, b'{"error": {"code": "invalid", "message": "no"}}')
        else:
            delivery.answered(202, {}, b"")
    assert delivery.accepted == 3
    assert [r.id for r in delivery.rejected] == [culprit]


def test_a_413_splits_the_batch() -> None:
    delivery = Delivery(events(3), NO_JITTER)
    delivery.answered(413, {}, b"")
    assert sent_ids(delivery.next_body() or b"") == ["e0"]
    delivery.answered(202, {}, b"")
    assert sent_ids(delivery.next_body() or b"") == ["e1", "e2"]


def test_retryable_answers_wait_at_least_retry_after_then_give_up_keeping_every_event() -> None:
    delivery = Delivery(events(2), RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.01))
    assert delivery.answered(503, {"retry-after": "2"}, b"") == 2.0
    assert delivery.answered(429, {"retry-after": "1"}, b"") == 1.0
    assert delivery.answered(503, {}, b"") == 0.0
    assert delivery.next_body() is None
    assert delivery.error is not None and "gave up after 3 attempts" in str(delivery.error)
    assert [e.id for e in delivery.unsent] == ["e0", "e1"]


def test_a_refusal_of_the_whole_request_keeps_the_events_for_later() -> None:
    delivery = Delivery(events(2), NO_JITTER)
    delivery.answered(401, {}, b'{"error": {"code": "unauthenticated", "message": "bad key"}}')
    assert delivery.error is not None
    assert (delivery.error.status, delivery.error.code) == (401, "unauthenticated")
    assert [e.id for e in delivery.unsent] == ["e0", "e1"]


def test_a_retry_that_would_pass_the_deadline_stops_at_once() -> None:
    clock = [100.0]
    delivery = Delivery(events(1), NO_JITTER, deadline=101.0, clock=lambda: clock[0])
    assert delivery.answered(503, {"retry-after": "5"}, b"") == 0.0
    assert delivery.error is not None and [e.id for e in delivery.unsent] == ["e0"]


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("Tue, 24 Nov 2026 10:00:30 GMT", NOW) == 30.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


def test_batches_stay_under_the_body_limit() -> None:
    big = {"k": "v" * 200}
    buffer = deque(
        make_event("api_calls", timestamp=NOW, properties={f"p{i}": big["k"] for i in range(16)})
        for _ in range(1000)
    )
    batch = take_batch(buffer, 1000)
    assert 0 < len(batch) < 1000
    assert len(batch_body(batch)) <= MAX_BATCH_BYTES
    assert len(batch) + len(buffer) == 1000


def test_quantities_travel_as_plain_decimal_strings_and_floats_are_refused() -> None:
    assert quantity_text(Decimal("1E+3")) == "1000"
    assert quantity_text(Decimal("1E-7")) == "0.0000001"
    assert quantity_text("12.5") == "12.5"
    with pytest.raises(TypeError):
        quantity_text(0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        quantity_text("NaN")


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValueError, match="time zone"):
        make_event("api_calls", timestamp=datetime(2026, 1, 1) + timedelta())


def test_the_client_distribution_depends_on_httpx_only_and_imports_no_server_code() -> None:
    project = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())
    assert [d.split(">")[0].split("=")[0] for d in project["project"]["dependencies"]] == ["httpx"]
    assert (ROOT / "clients" / "python" / "meterline_client" / "py.typed").exists()
    server = {"shared", "services", "meterline", "sqlalchemy", "faust", "stripe", "psycopg"}
    script = (
        "import sys, meterline_client; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(server)!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd="/"
    )
    assert out.stdout.strip() == "[]"
