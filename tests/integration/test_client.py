"""meterline_client.MeterlineClient against the real ingest service and broker."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Engine

from meterline_client import (
    BufferFull,
    EventsRejected,
    MeterlineClient,
    MeterlineClientError,
    RejectedEvent,
    RetryPolicy,
)
from shared.settings import Settings
from tests.ingest_support import (
    IngestServer,
    Tenant,
    event_ids_on_topic,
    free_port,
    make_tenant,
    run_ingest,
)

ROOT = Path(__file__).resolve().parents[2]


class RecordingTransport(httpx.HTTPTransport):
    """The real transport, remembering each request's event ids and each response's status."""

    def __init__(self, *, lose_first_response: bool = False) -> None:
        super().__init__()
        self.sent: list[list[str]] = []
        self.statuses: list[int] = []
        self._lose_first = lose_first_response
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        ids = [e["id"] for e in json.loads(request.read())["events"]]
        response = super().handle_request(request)
        response.read()
        with self._lock:
            self.sent.append(ids)
            self.statuses.append(response.status_code)
        if self._lose_first:
            self._lose_first = False
            raise httpx.ReadTimeout("response lost on the way back", request=request)
        return response


class GatedTransport(httpx.HTTPTransport):
    """The real transport, holding every request until `gate` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.holding = threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.holding.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return super().handle_request(request)


@pytest.fixture(scope="module")
def server(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IngestServer]:
    with run_ingest(service_env, tmp_path_factory.mktemp("client") / "ingest.log") as running:
        yield running


@pytest.fixture(scope="module")
def limited_server(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IngestServer]:
    """A service that allows each key 4 requests a second (burst 2)."""
    log = tmp_path_factory.mktemp("client-limited") / "ingest.log"
    with run_ingest(
        service_env,
        log,
        METERLINE_INGEST_RATE_LIMIT_PER_SECOND="4",
        METERLINE_INGEST_RATE_LIMIT_BURST="2",
    ) as running:
        yield running


@pytest.fixture(scope="module")
def brokerless_server(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IngestServer]:
    """A service whose broker never answers: every publish is a 503."""
    log = tmp_path_factory.mktemp("client-nobroker") / "ingest.log"
    env = {**service_env, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    with run_ingest(env, log, ready_path="/healthz") as running:
        yield running


@pytest.fixture
def tenant(engine: Engine) -> Tenant:
    return make_tenant(engine)


def on_topic(settings: Settings, tenant: Tenant, expect: int) -> list[str]:
    return event_ids_on_topic(
        settings.kafka_bootstrap_servers,
        settings.events_topic,
        tenant.organization_id,
        expect=expect,
    )


def test_a_full_batch_is_sent_at_once_and_the_rest_when_the_block_ends(
    server: IngestServer, tenant: Tenant, settings: Settings
) -> None:
    with MeterlineClient(server.url, tenant.key, batch_size=3, flush_interval=None) as client:
        ids = [client.record("api_calls", quantity=str(i)) for i in range(5)]
        assert client.pending == 2
    assert on_topic(settings, tenant, 5) == ids


def test_leaving_the_block_by_an_exception_flushes_then_reraises(
    server: IngestServer, tenant: Tenant, settings: Settings
) -> None:
    ids = []
    with (
        pytest.raises(RuntimeError, match="the caller's own error"),
        MeterlineClient(server.url, tenant.key, flush_interval=None) as client,
    ):
        ids = [client.record("api_calls") for _ in range(3)]
        raise RuntimeError("the caller's own error")
    assert on_topic(settings, tenant, 3) == ids


def test_the_background_flush_sends_within_the_interval_without_a_flush_call(
    server: IngestServer, tenant: Tenant, settings: Settings
) -> None:
    client = MeterlineClient(server.url, tenant.key, flush_interval=0.2)
    try:
        event_id = client.record("api_calls")
        deadline = time.monotonic() + 10
        while client.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.pending == 0
        assert on_topic(settings, tenant, 1) == [event_id]
    finally:
        client.close()


def test_interpreter_exit_sends_what_is_still_buffered(
    server: IngestServer, tenant: Tenant, settings: Settings
) -> None:
    script = (
        "import sys\n"
        "from meterline_client import MeterlineClient\n"
        "client = MeterlineClient(sys.argv[1], sys.argv[2], flush_interval=3600)\n"
        "print(','.join(client.record('api_calls') for _ in range(4)))\n"
        # no close(), no flush(): the process just ends
    )
    done = subprocess.run(
        [sys.executable, "-c", script, server.url, tenant.key],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    ids = done.stdout.strip().split(",")
    assert len(ids) == 4
    assert on_topic(settings, tenant, 4) == ids


def test_a_full_buffer_makes_record_wait_for_room(
    server: IngestServer, tenant: Tenant, settings: Settings
) -> None:
    transport = GatedTransport()
    client = MeterlineClient(
        server.url,
        tenant.key,
        batch_size=1,
        max_buffer=2,
        flush_interval=0.05,
        transport=transport,
    )
    try:
        ids = [client.record("api_calls"), client.record("api_calls")]
        assert transport.holding.wait(5)  # the first is on its way, held at the gate
        third: list[str] = []
        waiter = threading.Thread(target=lambda: third.append(client.record("api_calls")))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and client.pending == 2  # waiting, nothing dropped
        transport.gate.set()
        waiter.join(10)
        assert not waiter.is_alive()
        client.flush()
    finally:
        transport.gate.set()
        client.close()
    assert on_topic(settings, tenant, 3) == ids + third


def test_a_full_buffer_raises_buffer_full_after_block_timeout_and_records_nothing(
    server: IngestServer, tenant: Tenant, settings: Settings
) -> None:
    transport = GatedTransport()
    client = MeterlineClient(
        server.url,
        tenant.key,
        batch_size=1,
        max_buffer=2,
        block_timeout=0.3,
        flush_interval=0.05,
        transport=transport,
    )
    try:
        ids = [client.record("api_calls"), client.record("api_calls")]
        started = time.monotonic()
        with pytest.raises(BufferFull):
            client.record("api_calls", event_id="never-recorded")
        assert time.monotonic() - started >= 0.3
        transport.gate.set()
        client.flush()
    finally:
        transport.gate.set()
        client.close()
    assert on_topic(settings, tenant, 2) == ids


def test_refused_events_go_to_the_callback_and_the_rest_of_the_batch_is_sent(
    server: IngestServer, tenant: Tenant, settings: Settings
) -> None:
    rejected: list[RejectedEvent] = []
    too_old = datetime.now(UTC) - timedelta(days=60)
    with MeterlineClient(
        server.url, tenant.key, flush_interval=None, on_rejected=rejected.extend
    ) as client:
        first = client.record("api_calls")
        stale = client.record("api_calls", timestamp=too_old)
        last = client.record("api_calls", quantity="2.5")
        assert client.flush() == 2
        # The refused event poisons nothing: later flushes go through.
        later = client.record("api_calls")
        assert client.flush() == 1
    assert [(r.id, r.status) for r in rejected] == [(stale, 422)]
    assert "lateness horizon" in rejected[0].reason
    assert on_topic(settings, tenant, 3) == [first, last, later]


def test_without_a_callback_refused_events_are_raised_once(
    server: IngestServer, tenant: Tenant, settings: Settings
) -> None:
    client = MeterlineClient(server.url, tenant.key, flush_interval=None)
    good = client.record("api_calls")
    stale = client.record("api_calls", timestamp=datetime.now(UTC) - timedelta(days=60))
    with pytest.raises(EventsRejected) as raised:
        client.flush()
    assert [r.id for r in raised.value.rejected] == [stale]
    assert client.flush() == 0  # raised once, not again
    client.close()
    assert on_topic(settings, tenant, 1) == [good]


def test_lost_response_is_retried_with_the_same_ids(
    server: IngestServer, tenant: Tenant, settings: Settings
) -> None:
    transport = RecordingTransport(lose_first_response=True)
    client = MeterlineClient(
        server.url,
        tenant.key,
        transport=transport,
        flush_interval=None,
        retry=RetryPolicy(base_delay=0.01),
    )
    client.record("api_calls")
    client.record("api_calls", quantity="2.5")
    assert client.flush() == 2
    client.close()
    assert len(transport.sent) == 2 and transport.sent[0] == transport.sent[1]
    # Both deliveries reached the topic with the same ids: the aggregator's ledger counts them once.
    assert on_topic(settings, tenant, 4) == transport.sent[0] + transport.sent[1]


def test_503_is_retried_with_the_same_ids_honoring_retry_after_and_kept_when_retries_run_out(
    brokerless_server: IngestServer, tenant: Tenant
) -> None:
    transport = RecordingTransport()
    delays: list[float] = []
    client = MeterlineClient(
        brokerless_server.url,
        tenant.key,
        transport=transport,
        flush_interval=None,
        retry=RetryPolicy(attempts=3, base_delay=0.01),
        sleep=delays.append,
    )
    event_id = client.record("api_calls")
    with pytest.raises(MeterlineClientError, match="gave up"):
        client.flush()
    assert transport.statuses == [503, 503, 503]
    assert transport.sent == [[event_id]] * 3
    assert len(delays) == 2 and min(delays) >= 1  # the service's Retry-After: 1 s
    assert client.pending == 1  # kept for a later flush, with the same id
    with pytest.raises(MeterlineClientError):
        client.close(timeout=0.5)


def test_429_is_waited_out_and_every_event_is_accepted(
    limited_server: IngestServer, tenant: Tenant
) -> None:
    transport = RecordingTransport()
    with MeterlineClient(
        limited_server.url, tenant.key, transport=transport, batch_size=1, flush_interval=None
    ) as client:
        for _ in range(5):
            client.record("api_calls")  # a full batch of one: sent at once
        assert client.pending == 0
    assert 429 in transport.statuses
    assert transport.statuses.count(202) == 5


def test_usage_reads_typed_rows(server: IngestServer, tenant: Tenant) -> None:
    with MeterlineClient(server.url, tenant.key, flush_interval=None) as client:
        report = client.usage(granularity="day")
    assert report.granularity == "day" and report.end > report.start


def test_floats_are_refused_when_recorded() -> None:
    client = MeterlineClient("http://127.0.0.1:9", "ml_live_x", flush_interval=None)
    with pytest.raises(TypeError):
        client.record("api_calls", quantity=0.1)  # type: ignore[arg-type]
    client.close()
