"""Platform keys through the real ingest service and the real aggregator: one operator key posts
and reads the usage of many organizations, each named by its external id or id; every other key
keeps its own organization."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared.apikeys import revoke_api_key
from shared.db import unit_of_work
from tests import factories
from tests.aggregator_support import AggregatorProcess, totals, wait_for
from tests.ingest_support import IngestServer, bearer, event, rfc3339, run_ingest

REVOCATION_BOUND_SECONDS = 1.0


@dataclass(frozen=True)
class Platform:
    key: str
    key_id: uuid.UUID


@dataclass(frozen=True)
class Customer:
    organization_id: uuid.UUID
    external_id: str
    key: str  # the organization's own key


@pytest.fixture(scope="module")
def stack(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IngestServer]:
    # Topics of this module's own, so no other test's events reach its aggregator.
    env = {**service_env, "METERLINE_TOPIC_PREFIX": f"t{secrets.token_hex(4)}"}
    logs = tmp_path_factory.mktemp("platform")
    with run_ingest(
        env, logs / "ingest.log", METERLINE_KEY_CACHE_TTL_SECONDS=str(REVOCATION_BOUND_SECONDS)
    ) as server:
        aggregator = AggregatorProcess(env, Path(logs / "aggregator.log")).start()
        try:
            yield server
        finally:
            aggregator.stop()


@pytest.fixture
def client(stack: IngestServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        yield http


def make_platform(engine: Engine) -> Platform:
    with unit_of_work(engine) as session:
        created = factories.make_platform_key(session)
        return Platform(created.plaintext, created.key.id)


def make_customer(engine: Engine) -> Customer:
    external_id = f"cus_{secrets.token_hex(6)}"
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session, external_id=external_id)
        key = factories.make_api_key(session, organization)
        return Customer(organization.id, external_id, key.plaintext)


def test_platform_batch_for_two_customers_counts_each_in_its_own_organization_once(
    client: httpx.Client, engine: Engine
) -> None:
    platform = make_platform(engine)
    first, second = make_customer(engine), make_customer(engine)
    batch = [
        event("a-1", quantity=2, customer=first.external_id),
        event("b-1", quantity=5, customer=str(second.organization_id)),
        event("a-2", quantity=3, customer=first.external_id),
        # The same id in two organizations is two events: identity is (organization, id).
        event("a-1", quantity=7, customer=second.external_id),
    ]
    for _ in range(2):  # the resend is a duplicate of every event
        response = client.post("/v1/events", json={"events": batch}, headers=bearer(platform.key))
        assert response.status_code == 202, response.text
        assert response.json() == {"accepted": 4}

    wait_for(
        lambda: (
            totals(engine, first.organization_id)[1] >= 2
            and totals(engine, second.organization_id)[1] >= 2
        ),
        timeout=60,
        what="both customers' events counted",
    )
    time.sleep(1.0)  # a second count of the resend would have landed by now
    assert totals(engine, first.organization_id) == (Decimal(5), 2)
    assert totals(engine, second.organization_id) == (Decimal(12), 2)
    with engine.connect() as connection:
        writers = connection.execute(
            sa.text("SELECT DISTINCT api_key_id FROM usage_records WHERE organization_id = :o"),
            {"o": first.organization_id},
        ).scalars()
        assert list(writers) == [platform.key_id]


def test_platform_key_reads_the_usage_of_the_customer_it_names(
    client: httpx.Client, engine: Engine
) -> None:
    platform = make_platform(engine)
    customer, other = make_customer(engine), make_customer(engine)
    now = datetime.now(UTC)
    posted = client.post(
        "/v1/events",
        json={"events": [event(quantity=4, customer=customer.external_id, timestamp=rfc3339(now))]},
        headers=bearer(platform.key),
    )
    assert posted.status_code == 202, posted.text
    wait_for(lambda: totals(engine, customer.organization_id)[1] == 1, timeout=60)
    window = {"from": rfc3339(now - timedelta(hours=2)), "to": rfc3339(now + timedelta(hours=1))}

    usage = client.get(
        "/v1/usage",
        params={**window, "customer": customer.external_id},
        headers=bearer(platform.key),
    )
    assert usage.status_code == 200, usage.text
    assert [(r["metric"], r["quantity"]) for r in usage.json()["data"]] == [("api_calls", "4")]
    by_id = client.get(
        "/v1/usage",
        params={**window, "customer": str(other.organization_id)},
        headers=bearer(platform.key),
    )
    assert by_id.status_code == 200 and by_id.json()["data"] == []


def test_organization_key_naming_a_customer_is_forbidden(
    client: httpx.Client, engine: Engine
) -> None:
    customer, other = make_customer(engine), make_customer(engine)
    own = client.post(
        "/v1/events",
        json=event(customer=customer.external_id),
        headers=bearer(customer.key),
    )
    assert own.status_code == 403, own.text
    foreign = client.post(
        "/v1/events", json=event(customer=other.external_id), headers=bearer(customer.key)
    )
    assert foreign.status_code == 403
    assert foreign.json()["error"]["details"][0]["index"] == 0
    usage = client.get(
        "/v1/usage", params={"customer": other.external_id}, headers=bearer(customer.key)
    )
    assert usage.status_code == 403, usage.text


def test_unknown_customer_refuses_the_whole_batch_and_names_it(
    client: httpx.Client, engine: Engine
) -> None:
    platform = make_platform(engine)
    customer = make_customer(engine)
    batch = [
        event("kept-out", customer=customer.external_id),
        event("stranger", customer="cus_nobody_knows"),
    ]
    response = client.post("/v1/events", json={"events": batch}, headers=bearer(platform.key))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "unknown_customer"
    assert "cus_nobody_knows" in error["message"]
    assert error["details"] == [{"index": 1, "reason": "unknown customer 'cus_nobody_knows'"}]
    usage = client.get(
        "/v1/usage", params={"customer": "cus_nobody_knows"}, headers=bearer(platform.key)
    )
    assert usage.status_code == 422 and "cus_nobody_knows" in usage.json()["error"]["message"]

    # Proof that nothing of the refused batch was published: a later event is counted alone.
    marker = client.post(
        "/v1/events", json=event(customer=customer.external_id), headers=bearer(platform.key)
    )
    assert marker.status_code == 202
    wait_for(lambda: totals(engine, customer.organization_id)[1] >= 1, timeout=60)
    time.sleep(1.0)
    assert totals(engine, customer.organization_id)[1] == 1


def test_platform_key_must_name_a_customer(client: httpx.Client, engine: Engine) -> None:
    platform = make_platform(engine)
    response = client.post("/v1/events", json=event(), headers=bearer(platform.key))
    assert response.status_code == 422
    assert response.json()["error"]["details"] == [
        {"index": 0, "reason": "customer: required with a platform key"}
    ]
    usage = client.get("/v1/usage", headers=bearer(platform.key))
    assert usage.status_code == 422
    assert usage.json()["error"]["details"] == ["customer: required with a platform key"]


def test_revoked_platform_key_is_refused_within_bound(client: httpx.Client, engine: Engine) -> None:
    platform = make_platform(engine)
    customer = make_customer(engine)
    body = event(customer=customer.external_id)
    assert client.post("/v1/events", json=body, headers=bearer(platform.key)).status_code == 202
    with unit_of_work(engine) as session:
        revoke_api_key(session, platform.key_id, actor_id=None, now=datetime.now(UTC))
    revoked_at = time.monotonic()
    time.sleep(REVOCATION_BOUND_SECONDS + 0.2)
    refused = client.post(
        "/v1/events", json=event(customer=customer.external_id), headers=bearer(platform.key)
    )
    assert refused.status_code == 401
    assert time.monotonic() - revoked_at < REVOCATION_BOUND_SECONDS + 5


def test_platform_event_project_must_belong_to_its_customer(
    client: httpx.Client, engine: Engine
) -> None:
    platform = make_platform(engine)
    customer, other = make_customer(engine), make_customer(engine)
    with unit_of_work(engine) as session:
        organization = session.get(factories.Organization, other.organization_id)
        assert organization is not None
        foreign_project = factories.make_project(session, organization).id
    response = client.post(
        "/v1/events",
        json=event(customer=customer.external_id, project_id=str(foreign_project)),
        headers=bearer(platform.key),
    )
    assert response.status_code == 403, response.text
    accepted = client.post(
        "/v1/events",
        json=event(customer=other.external_id, project_id=str(foreign_project)),
        headers=bearer(platform.key),
    )
    assert accepted.status_code == 202, accepted.text
