"""Property-based fuzzing of the ingest handler: no input, however odd, gets a 5xx.

Runs the real app in-process (real PostgreSQL for keys and projects, in-memory publisher) so that
a few hundred examples take seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from services.ingest.app import create_app
from services.ingest.publisher import InMemoryPublisher
from shared.events import decode_envelope
from shared.settings import Settings
from tests import factories
from tests.ingest_support import Tenant, make_tenant

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["NaN", "1e999", "-1", "2026-11-24T10:00:00Z", "api_calls"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
field_values = {
    "id": st.text(max_size=140) | json_values,
    "metric": st.from_regex(r"\A[a-zA-Z0-9_.\- ]{0,66}\Z") | json_values,
    "quantity": st.decimals(allow_nan=True).map(str) | st.integers() | json_values,
    "timestamp": st.datetimes().map(lambda d: d.isoformat() + "Z") | json_values,
    "project_id": st.uuids().map(str) | json_values,
    "properties": st.dictionaries(st.text(max_size=70), st.text(max_size=300), max_size=18)
    | json_values,
}
# Mostly valid events (so that acceptance is exercised too), each field possibly replaced.
valid_events = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=40),
        "metric": st.from_regex(r"\A[a-z][a-z0-9_.-]{0,10}\Z"),
        "quantity": st.decimals(min_value=0, max_value=10**12, places=3).map(str)
        | st.integers(min_value=0, max_value=10**12),
    },
    optional={
        "properties": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
        "timestamp": field_values["timestamp"],
    },
)
events = valid_events | st.fixed_dictionaries({}, optional=field_values) | json_values
bodies = st.one_of(
    events.map(lambda e: json.dumps(e).encode()),
    st.lists(events, max_size=5).map(lambda es: json.dumps({"events": es}).encode()),
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
)


@pytest.fixture(scope="module")
def tenant(engine: Engine) -> Tenant:
    return make_tenant(engine)


@pytest.fixture
def app_client(
    make_settings: Callable[..., Settings],
) -> Iterator[tuple[TestClient, InMemoryPublisher]]:
    publisher = InMemoryPublisher()
    app_settings = make_settings(
        api_key_pepper=factories.PEPPER.decode(), ingest_rate_limit_per_second=1e9
    )
    app = create_app(app_settings, publisher=publisher, configure_logs=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, publisher


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=bodies,
    content_type=st.sampled_from(
        ["application/json", "text/plain", "application/cloudevents+json"]
    ),
    scoped=st.booleans(),
)
def test_no_input_gets_a_5xx(
    app_client: tuple[TestClient, InMemoryPublisher],
    tenant: Tenant,
    body: bytes,
    content_type: str,
    scoped: bool,
) -> None:
    client, publisher = app_client
    published_before = len(publisher.records)
    response = client.post(
        "/v1/events",
        content=body,
        headers={
            "Authorization": f"Bearer {tenant.scoped_key if scoped else tenant.key}",
            "Content-Type": content_type,
        },
    )
    assert response.status_code < 500, response.text
    assert response.status_code in {202, 403, 415, 422}
    if response.status_code == 202:
        [record] = publisher.records[published_before:]
        assert len(decode_envelope(record.value).events) == response.json()["accepted"]
    else:
        assert len(publisher.records) == published_before
        assert "error" in response.json()


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    params=st.dictionaries(
        st.sampled_from(["from", "to", "metric", "group_by", "granularity", "x"]),
        st.text(max_size=30) | st.datetimes().map(lambda d: d.isoformat() + "Z"),
    )
)
def test_no_usage_query_gets_a_5xx(
    app_client: tuple[TestClient, InMemoryPublisher], tenant: Tenant, params: dict[str, str]
) -> None:
    client, _ = app_client
    response = client.get(
        "/v1/usage", params=params, headers={"Authorization": f"Bearer {tenant.key}"}
    )
    assert response.status_code in {200, 422}, response.text
