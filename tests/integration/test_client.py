"""meterline.client.MeterlineClient against the real ingest service and broker."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy.engine import Engine

from meterline.client import MeterlineClient, MeterlineClientError, RetryPolicy
from shared.settings import Settings
from tests.ingest_support import (
    IngestServer,
    Tenant,
    free_port,
    make_tenant,
    read_topic,
    run_ingest,
)


class RecordingTransport(httpx.HTTPTransport):
    """The real transport, remembering each request's events and each response's status."""

    def __init__(self, *, lose_first_response: bool = False) -> None:
        super().__init__()
        self.sent: list[list[str]] = []
        self.statuses: list[int] = []
        self._lose_first = lose_first_response

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.read())
        self.sent.append([e["id"] for e in body["events"]])
        response = super().handle_request(request)
        response.read()
        self.statuses.append(response.status_code)
        if self._lose_first:
            self._lose_first = False
            raise httpx.ReadTimeout("response lost on the way back", request=request)
        return response


@pytest.fixture(scope="module")
def server(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IngestServer]:
    log = tmp_path_factory.mktemp("client") / "ingest.log"
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


def test_recorded_events_are_flushed_in_batches_with_their_ids(
    server: IngestServer, tenant: Tenant, settings: Settings
) -> None:
    with MeterlineClient(server.url, tenant.key, batch_size=3) as client:
        ids = [client.record("api_calls", quantity=str(i)) for i in range(5)]
        # The first full batch of 3 went as soon as it was buffered.
        assert client.pending == 2
    records = read_topic(
        settings.kafka_bootstrap_servers, settings.events_topic, tenant.organization_id, expect=2
    )
    assert [[e.id for e in r.envelope.events] for r in records] == [ids[:3], ids[3:]]


def test_lost_response_is_retried_with_the_same_ids(
    server: IngestServer, tenant: Tenant, settings: Settings
) -> None:
    transport = RecordingTransport(lose_first_response=True)
    client = MeterlineClient(
        server.url, tenant.key, transport=transport, retry=RetryPolicy(base_delay=0.01)
    )
    client.record("api_calls")
    client.record("api_calls", quantity="2.5")
    assert client.flush() == 2
    assert len(transport.sent) == 2
    assert transport.sent[0] == transport.sent[1]
    records = read_topic(
        settings.kafka_bootstrap_servers, settings.events_topic, tenant.organization_id, expect=2
    )
    # Both deliveries reached the topic with the same ids: the aggregator's ledger counts them once.
    assert [[e.id for e in r.envelope.events] for r in records] == transport.sent


def test_503_is_retried_with_the_same_ids_honoring_retry_after(
    brokerless_server: IngestServer, tenant: Tenant
) -> None:
    transport = RecordingTransport()
    delays: list[float] = []
    client = MeterlineClient(
        brokerless_server.url,
        tenant.key,
        transport=transport,
        retry=RetryPolicy(attempts=3, base_delay=0.01),
        sleep=delays.append,
    )
    event_id = client.record("api_calls")
    with pytest.raises(MeterlineClientError, match="gave up"):
        client.flush()
    assert transport.statuses == [503, 503, 503]
    assert transport.sent == [[event_id]] * 3
    assert len(delays) == 2 and min(delays) >= 1
    assert client.pending == 1  # kept for a later flush, with the same id


def test_429_is_waited_out_and_every_event_is_accepted(
    server: IngestServer, tenant: Tenant
) -> None:
    transport = RecordingTransport()
    client = MeterlineClient(server.url, tenant.key, transport=transport, batch_size=1)
    for _ in range(5):
        client.record("api_calls")  # a full batch of one: sent at once
    assert client.pending == 0
    assert 429 in transport.statuses
    assert transport.statuses.count(202) == 5


def test_invalid_event_raises_at_once_without_retry(server: IngestServer, tenant: Tenant) -> None:
    transport = RecordingTransport()
    client = MeterlineClient(server.url, tenant.key, transport=transport)
    client.record("Not A Metric")
    with pytest.raises(MeterlineClientError) as raised:
        client.flush()
    assert raised.value.status == 422
    assert len(transport.sent) == 1


def test_client_rejects_float_quantities() -> None:
    client = MeterlineClient("http://127.0.0.1:9", "ml_live_x")
    with pytest.raises(TypeError):
        client.record("api_calls", quantity=0.1)  # type: ignore[arg-type]
