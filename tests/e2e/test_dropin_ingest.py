"""The official OpenMeter and Lago Python SDKs, unmodified, pointed at a running Meterline (base
URL and key only): their events go through the real ingest service, Kafka and the real aggregator
and land in usage_records exactly once, resends included."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import lago_python_client
import openmeter
import pytest
from corehttp.exceptions import HttpResponseError
from lago_python_client.exceptions import LagoApiError
from lago_python_client.models import BatchEvent
from lago_python_client.models import Event as LagoEvent
from openmeter._generated.models import Event as CloudEvent
from sqlalchemy.engine import Engine

from shared.db import unit_of_work
from tests import factories
from tests.aggregator_support import AggregatorProcess, totals, wait_for
from tests.ingest_support import IngestServer, run_ingest


@dataclass(frozen=True)
class Customer:
    organization_id: uuid.UUID
    external_id: str
    subscription_external_id: str
    key: str  # the organization's own key


@pytest.fixture(scope="module")
def stack(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IngestServer]:
    env = {**service_env, "METERLINE_TOPIC_PREFIX": f"t{secrets.token_hex(4)}"}
    logs = tmp_path_factory.mktemp("dropins")
    with run_ingest(env, logs / "ingest.log") as server:
        aggregator = AggregatorProcess(env, Path(logs / "aggregator.log")).start()
        try:
            yield server
        finally:
            aggregator.stop()


@pytest.fixture
def platform_key(engine: Engine) -> str:
    with unit_of_work(engine) as session:
        return factories.make_platform_key(session).plaintext


def make_customer(engine: Engine) -> Customer:
    suffix = secrets.token_hex(5)
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session, external_id=f"cus_{suffix}")
        plan = factories.make_plan(session)
        factories.make_subscription(session, organization, plan, external_id=f"sub_{suffix}")
        key = factories.make_api_key(session, organization)
        return Customer(organization.id, f"cus_{suffix}", f"sub_{suffix}", key.plaintext)


def cloud_event(event_id: str, subject: str, data: dict[str, object] | None) -> CloudEvent:
    return CloudEvent(
        id=event_id,
        source="billing-backend",
        specversion="1.0",
        type="api_calls",
        subject=subject,
        time=datetime.now(UTC) - timedelta(minutes=1),
        data=data,
    )


def counted(engine: Engine, customer: Customer, count: int) -> tuple[Decimal, int]:
    """The customer's totals once `count` events are in, and after a pause in which a double
    count of a resend would have landed."""
    wait_for(lambda: totals(engine, customer.organization_id)[1] >= count, timeout=60)
    time.sleep(1.0)
    return totals(engine, customer.organization_id)


def test_openmeter_sdk_events_land_once_per_customer_resends_included(
    stack: IngestServer, engine: Engine, platform_key: str
) -> None:
    first, second = make_customer(engine), make_customer(engine)
    client = openmeter.Client(endpoint=f"{stack.url}/openmeter", token=platform_key)
    client.events.ingest_event(cloud_event("om-1", first.external_id, {"value": 2, "path": "/a"}))
    batch = [
        cloud_event("om-2", first.external_id, {"value": "3.5"}),
        cloud_event("om-1", second.external_id, {"value": 10}),  # another customer's om-1
        cloud_event("om-3", str(second.organization_id), {"region": "eu"}),  # no value: counts 1
    ]
    client.events.ingest_events(batch)
    client.events.ingest_events(batch)  # the resend
    client.events.ingest_event(cloud_event("om-1", first.external_id, {"value": 2, "path": "/a"}))

    assert counted(engine, first, 2) == (Decimal("5.5"), 2)
    assert counted(engine, second, 2) == (Decimal(11), 2)


def test_openmeter_batch_with_one_bad_event_is_refused_whole(
    stack: IngestServer, engine: Engine, platform_key: str
) -> None:
    customer = make_customer(engine)
    client = openmeter.Client(endpoint=f"{stack.url}/openmeter", token=platform_key)
    good = cloud_event("om-good", customer.external_id, {"value": 1})
    bad = cloud_event("om-bad", customer.external_id, {"value": -4})
    unknown = cloud_event("om-stranger", "cus_nobody", {"value": 1})
    for refused, named in (([good, bad], "data.value"), ([good, unknown], "cus_nobody")):
        with pytest.raises(HttpResponseError) as caught:
            client.events.ingest_events(refused)
        assert caught.value.status_code == 400
        assert named in caught.value.response.text()
    client.events.ingest_event(cloud_event("om-marker", customer.external_id, {"value": 7}))
    assert counted(engine, customer, 1) == (Decimal(7), 1)


def test_openmeter_organization_key_may_name_only_its_own_organization(
    stack: IngestServer, engine: Engine
) -> None:
    customer, other = make_customer(engine), make_customer(engine)
    client = openmeter.Client(endpoint=f"{stack.url}/openmeter", token=customer.key)
    client.events.ingest_event(cloud_event("own", customer.external_id, {"value": 4}))
    with pytest.raises(HttpResponseError) as caught:
        client.events.ingest_event(cloud_event("foreign", other.external_id, {"value": 4}))
    assert caught.value.status_code == 403
    assert counted(engine, customer, 1) == (Decimal(4), 1)
    assert totals(engine, other.organization_id) == (Decimal(0), 0)


def lago_event(transaction_id: str, subscription: str, **properties: object) -> LagoEvent:
    return LagoEvent(
        transaction_id=transaction_id,
        external_subscription_id=subscription,
        code="api_calls",
        timestamp=int((datetime.now(UTC) - timedelta(minutes=1)).timestamp()),
        precise_total_amount_cents=None,
        properties=properties or None,
    )


def test_lago_sdk_events_land_once_per_subscription_resends_included(
    stack: IngestServer, engine: Engine, platform_key: str
) -> None:
    first, second = make_customer(engine), make_customer(engine)
    client = lago_python_client.Client(api_key=platform_key, api_url=f"{stack.url}/lago/")
    answered = client.events.create(lago_event("tx-1", first.subscription_external_id, region="eu"))
    assert answered is not None
    assert answered.transaction_id == "tx-1"
    assert answered.external_subscription_id == first.subscription_external_id
    batch = BatchEvent(
        events=[
            lago_event("tx-2", first.subscription_external_id, tokens=12),
            lago_event("tx-1", second.subscription_external_id),
            lago_event("tx-3", second.subscription_external_id),
        ]
    )
    client.events.batch_create(batch)
    client.events.batch_create(batch)  # the resend
    client.events.create(lago_event("tx-1", first.subscription_external_id, region="eu"))

    # No meter names a value property: each event counts 1, as Lago's count aggregation.
    assert counted(engine, first, 2) == (Decimal(2), 2)
    assert counted(engine, second, 2) == (Decimal(2), 2)


def test_lago_unknown_subscription_is_refused_naming_it(
    stack: IngestServer, engine: Engine, platform_key: str
) -> None:
    customer = make_customer(engine)
    client = lago_python_client.Client(api_key=platform_key, api_url=f"{stack.url}/lago/")
    batch = BatchEvent(
        events=[
            lago_event("tx-kept-out", customer.subscription_external_id),
            lago_event("tx-stranger", "sub_nobody"),
        ]
    )
    with pytest.raises(LagoApiError) as caught:
        client.events.batch_create(batch)
    assert caught.value.status_code == 422
    assert "sub_nobody" in str(caught.value.response)
    client.events.create(lago_event("tx-marker", customer.subscription_external_id))
    assert counted(engine, customer, 1) == (Decimal(1), 1)


def test_lago_refuses_a_bad_key(stack: IngestServer, engine: Engine) -> None:
    customer = make_customer(engine)
    client = lago_python_client.Client(api_key="ml_live_nope", api_url=f"{stack.url}/lago/")
    with pytest.raises(LagoApiError) as caught:
        client.events.create(lago_event("tx-1", customer.subscription_external_id))
    assert caught.value.status_code == 401


def test_lago_organization_key_may_name_only_its_own_subscriptions(
    stack: IngestServer, engine: Engine
) -> None:
    customer, other = make_customer(engine), make_customer(engine)
    client = lago_python_client.Client(api_key=customer.key, api_url=f"{stack.url}/lago/")
    client.events.create(lago_event("tx-own", customer.subscription_external_id))
    with pytest.raises(LagoApiError) as caught:
        client.events.create(lago_event("tx-foreign", other.subscription_external_id))
    assert caught.value.status_code == 403
    assert counted(engine, customer, 1) == (Decimal(1), 1)
    assert totals(engine, other.organization_id) == (Decimal(0), 0)


def test_openmeter_route_refuses_other_media_types_as_a_problem(
    stack: IngestServer, platform_key: str
) -> None:
    import httpx

    response = httpx.post(
        f"{stack.url}/openmeter/api/v1/events",
        content=b"id=1",
        headers={"Authorization": f"Bearer {platform_key}", "Content-Type": "text/plain"},
    )
    assert response.status_code == 415
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 415
    refused = httpx.post(f"{stack.url}/openmeter/api/v1/events", json={})
    assert refused.status_code == 401
    assert refused.headers["content-type"] == "application/problem+json"


def test_lago_timestamp_of_a_huge_exponent_is_refused_at_once(
    stack: IngestServer, engine: Engine, platform_key: str
) -> None:
    import httpx

    customer = make_customer(engine)
    # Turning 1e999999 into an int takes tens of seconds of the worker's only thread.
    body = (
        '{"event": {"transaction_id": "tx-far", "code": "api_calls", "timestamp": 1e999999,'
        f' "external_subscription_id": "{customer.subscription_external_id}"}}}}'
    )
    started = time.monotonic()
    response = httpx.post(
        f"{stack.url}/lago/api/v1/events",
        content=body,
        headers={"Authorization": f"Bearer {platform_key}", "Content-Type": "application/json"},
        timeout=5,
    )
    assert time.monotonic() - started < 5
    assert response.status_code == 422
    assert response.json()["error_details"] == {
        "0": "timestamp: Unix seconds (a number, or its text)"
    }
