"""POST /v1/events and GET /v1/usage of the real service (a subprocess), real PostgreSQL, Kafka."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import BinaryIO

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared.apikeys import revoke_api_key
from shared.db import unit_of_work
from shared.events import MAX_BODY_BYTES
from shared.keys import generate_key
from shared.models import ApiKey, Organization, Project, Role, User
from shared.organizations import change_role, delete_organization
from shared.settings import Settings
from shared.usage import UsageDelta, record_usage
from tests import factories
from tests.ingest_support import (
    IngestServer,
    Tenant,
    bearer,
    event,
    make_tenant,
    read_topic,
    rfc3339,
    run_ingest,
)

REVOCATION_BOUND_SECONDS = 1.0  # the service below runs with METERLINE_KEY_CACHE_TTL_SECONDS=1


@pytest.fixture(scope="module")
def server(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IngestServer]:
    log = tmp_path_factory.mktemp("ingest") / "ingest.log"
    with run_ingest(
        service_env,
        log,
        METERLINE_KEY_CACHE_TTL_SECONDS=str(REVOCATION_BOUND_SECONDS),
        METERLINE_INGEST_RATE_LIMIT_PER_SECOND="20",
        METERLINE_INGEST_RATE_LIMIT_BURST="40",
        METERLINE_KEY_USAGE_FLUSH_SECONDS="0.5",
    ) as running:
        yield running


@pytest.fixture
def tenant(engine: Engine) -> Tenant:
    return make_tenant(engine)


@pytest.fixture
def client(server: IngestServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def test_valid_batch_is_on_the_topic_keyed_by_organization(
    client: httpx.Client, tenant: Tenant, settings: Settings
) -> None:
    events = [event(f"batch-{i}", quantity=f"{i}.5") for i in range(3)]
    before = datetime.now(UTC)
    response = client.post("/v1/events", json={"events": events}, headers=bearer(tenant.key))
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 3}

    records = read_topic(
        settings.kafka_bootstrap_servers, settings.events_topic, tenant.organization_id, expect=1
    )
    assert len(records) == 1
    record = records[0]
    assert record.key == str(tenant.organization_id).encode()
    envelope = record.envelope
    assert envelope.organization_id == tenant.organization_id
    assert envelope.api_key_id == tenant.key_id
    assert [e.id for e in envelope.events] == ["batch-0", "batch-1", "batch-2"]
    assert [e.quantity for e in envelope.events] == [Decimal("0.5"), Decimal("1.5"), Decimal("2.5")]
    assert envelope.received_at >= before - timedelta(seconds=1)
    assert record.timestamp_ms == int(envelope.received_at.timestamp() * 1000)


def test_single_event_without_project_gets_the_scoped_keys_project(
    client: httpx.Client, tenant: Tenant, settings: Settings
) -> None:
    response = client.post("/v1/events", json=event("one"), headers=bearer(tenant.scoped_key))
    assert response.status_code == 202, response.text
    [record] = read_topic(
        settings.kafka_bootstrap_servers, settings.events_topic, tenant.organization_id, expect=1
    )
    assert record.envelope.events[0].project_id == tenant.project_id
    assert record.envelope.api_key_id == tenant.scoped_key_id


def test_invalid_event_anywhere_in_a_batch_publishes_nothing(
    client: httpx.Client, tenant: Tenant, settings: Settings
) -> None:
    events = [event("good-1"), event("bad", quantity=-1), event("good-2"), {"metric": "x"}]
    response = client.post("/v1/events", json={"events": events}, headers=bearer(tenant.key))
    assert response.status_code == 422
    details = response.json()["error"]["details"]
    assert [d["index"] for d in details] == [1, 3]
    assert "quantity" in details[0]["reason"]
    assert "id" in details[1]["reason"]
    records = read_topic(
        settings.kafka_bootstrap_servers,
        settings.events_topic,
        tenant.organization_id,
        expect=1,
        timeout=3,
    )
    assert records == []


UNSTORABLE = {
    # field: (the event's JSON with a \u escape PostgreSQL cannot store, the reason's start)
    "id": ('"id": "x\\u0000y", "metric": "api_calls"', "id: contains U+0000"),
    "id-surrogate": ('"id": "x\\ud800", "metric": "api_calls"', "id: contains a lone UTF-16"),
    "metric": ('"id": "m", "metric": "api\\u0000calls"', "metric: contains U+0000"),
    "project_id": (
        '"id": "p", "metric": "api_calls", "project_id": "\\u0000"',
        "project_id: contains U+0000",
    ),
    "property-name": (
        '"id": "k", "metric": "api_calls", "properties": {"re\\u0000gion": "eu"}',
        "properties: the name",
    ),
    "property-value": (
        '"id": "v", "metric": "api_calls", "properties": {"region": "e\\udfffu"}',
        "properties.region: contains a lone UTF-16",
    ),
}


@pytest.mark.parametrize(("fields", "reason"), UNSTORABLE.values(), ids=UNSTORABLE)
def test_text_postgresql_cannot_store_is_422_naming_the_field_and_publishes_nothing(
    client: httpx.Client, tenant: Tenant, settings: Settings, fields: str, reason: str
) -> None:
    body = '{"events": [{"id": "fine", "metric": "api_calls"}, {' + fields + "}]}"
    response = client.post(
        "/v1/events",
        content=body.encode(),
        headers={**bearer(tenant.key), "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    [detail] = response.json()["error"]["details"]
    assert detail["index"] == 1 and detail["reason"].startswith(reason), detail
    records = read_topic(
        settings.kafka_bootstrap_servers,
        settings.events_topic,
        tenant.organization_id,
        expect=1,
        timeout=2,
    )
    assert records == []


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("ml_live_aaaaaaaa_" + "a" * 58), {"Authorization": "Basic dXNlcjpwYXNz"}],
    ids=["missing", "unknown", "not-bearer"],
)
def test_missing_or_unknown_key_is_401(client: httpx.Client, headers: dict[str, str]) -> None:
    response = client.post("/v1/events", json=event(), headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"


def _post(
    key: str | None,
    body: bytes = b'{"id":"x","metric":"api_calls"}',
    version: str = "1.1",
    path: str = "/v1/events",
) -> bytes:
    head = [f"POST {path} HTTP/{version}", "Host: ingest", "Content-Type: application/json"]
    head += [f"Authorization: Bearer {key}"] if key else []
    head += [f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _answer(reader: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    status = int(reader.readline().split()[1])
    headers = {}
    while (line := reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    return status, headers, reader.read(int(headers["content-length"]))


def test_refusals_answered_before_the_app_read_as_the_apps_and_keep_their_order(
    server: IngestServer, tenant: Tenant
) -> None:
    made_up = generate_key().plaintext
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        reader = connection.makefile("rb")
        connection.sendall(_post(made_up))  # read from the database: the app answers
        by_app = _answer(reader)
        # Now remembered, so refused by the front door; pipelined around a valid request.
        valid = json.dumps(event()).encode()
        connection.sendall(_post(made_up) + _post(tenant.key, valid) + _post(made_up))
        answers = [_answer(reader) for _ in range(3)]
        # The connection was refused: what it sends next waits its turn, and is still answered.
        connection.sendall(_post(tenant.key, json.dumps(event()).encode()) + _post(made_up))
        after_refusal = [_answer(reader)[0] for _ in range(2)]
    assert after_refusal == [202, 401]
    assert by_app[0] == 401
    assert [status for status, _, _ in answers] == [401, 202, 401]
    for _, headers, body in (answers[0], answers[2]):
        assert body == by_app[2]
        assert headers.keys() == by_app[1].keys()  # the date may differ; nothing else does
        assert {k: v for k, v in headers.items() if k != "date"} == {
            k: v for k, v in by_app[1].items() if k != "date"
        }
        assert headers["www-authenticate"] == "Bearer"
    # HTTP/1.0 without keep-alive: answered, then the connection is closed.
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(_post(None, version="1.0"))
        reader = connection.makefile("rb")
        status, headers, _ = _answer(reader)
        assert (status, headers["connection"]) == (401, "close")
        assert reader.read() == b""


def test_expired_key_is_401_with_the_same_message(
    client: httpx.Client, engine: Engine, tenant: Tenant
) -> None:
    from shared.models import Organization
    from tests import factories

    with unit_of_work(engine) as session:
        organization = session.get(Organization, tenant.organization_id)
        assert organization is not None
        expired = factories.make_api_key(
            session, organization, expires_at=datetime.now(UTC) - timedelta(seconds=1)
        )
    unknown = client.post("/v1/events", json=event(), headers=bearer("ml_live_x"))
    response = client.post("/v1/events", json=event(), headers=bearer(expired.plaintext))
    assert response.status_code == 401
    assert response.json() == unknown.json()


def test_revoked_key_is_refused_within_bound(
    client: httpx.Client, engine: Engine, tenant: Tenant
) -> None:
    assert client.post("/v1/events", json=event(), headers=bearer(tenant.key)).status_code == 202
    with unit_of_work(engine) as session:
        revoke_api_key(session, tenant.key_id, actor_id=None, now=datetime.now(UTC))
    revoked_at = time.monotonic()
    statuses = []
    while time.monotonic() - revoked_at < REVOCATION_BOUND_SECONDS + 3:
        statuses.append(
            (
                time.monotonic() - revoked_at,
                client.post("/v1/events", json=event(), headers=bearer(tenant.key)).status_code,
            )
        )
        if statuses[-1][1] == 401:
            break
        time.sleep(0.05)
    refused_after, status = statuses[-1]
    assert status == 401
    # The bound, plus the time a request and the cache's database read take.
    assert refused_after <= REVOCATION_BOUND_SECONDS + 0.5
    assert {s for _, s in statuses[:-1]} <= {202}


def _refused_after(client: httpx.Client, post: Callable[[], httpx.Response], refused: int) -> float:
    """Seconds from now until `post` is answered `refused`; every answer before it is 202."""
    started = time.monotonic()
    while time.monotonic() - started < REVOCATION_BOUND_SECONDS + 5:
        response = post()
        if response.status_code == refused:
            return time.monotonic() - started
        assert response.status_code == 202, response.text
        time.sleep(0.05)
    raise AssertionError(f"still not {refused} after {REVOCATION_BOUND_SECONDS + 5}s")


def _post_as(client: httpx.Client, key: str, **fields: object) -> Callable[[], httpx.Response]:
    return lambda: client.post("/v1/events", json=event(**fields), headers=bearer(key))


def test_key_of_a_deleted_organization_is_refused_within_bound(
    client: httpx.Client, engine: Engine, tenant: Tenant
) -> None:
    post = _post_as(client, tenant.key)
    assert post().status_code == 202
    with unit_of_work(engine) as session:
        delete_organization(session, tenant.organization_id, actor_id=None)

    # The bound, plus the time a request and the cache's database read take.
    assert _refused_after(client, post, 401) <= REVOCATION_BOUND_SECONDS + 0.5


def test_deleted_key_is_refused_within_bound(
    client: httpx.Client, engine: Engine, tenant: Tenant
) -> None:
    post = _post_as(client, tenant.key)
    assert post().status_code == 202
    with unit_of_work(engine) as session:
        session.delete(session.get(ApiKey, tenant.key_id))

    assert _refused_after(client, post, 401) <= REVOCATION_BOUND_SECONDS + 0.5


def test_deleted_project_and_its_key_are_refused_within_bound(
    client: httpx.Client, engine: Engine, tenant: Tenant
) -> None:
    scoped = _post_as(client, tenant.scoped_key)
    into_project = _post_as(client, tenant.key, project_id=str(tenant.project_id))
    assert (scoped().status_code, into_project().status_code) == (202, 202)
    with unit_of_work(engine) as session:
        session.delete(session.get(ApiKey, tenant.scoped_key_id))
        session.flush()
        session.delete(session.get(Project, tenant.project_id))

    assert _refused_after(client, scoped, 401) <= REVOCATION_BOUND_SECONDS + 0.5
    assert _refused_after(client, into_project, 403) <= REVOCATION_BOUND_SECONDS + 0.5


def test_user_scoped_key_of_a_deleted_user_is_refused_within_bound(
    client: httpx.Client, engine: Engine, tenant: Tenant
) -> None:
    with unit_of_work(engine) as session:
        organization = session.get(Organization, tenant.organization_id)
        assert organization is not None
        member = factories.add_member(session, organization, Role.MEMBER)
        member_id = member.id
        created = factories.make_api_key(session, organization, user=member)
    post = _post_as(client, created.plaintext)
    assert post().status_code == 202
    with unit_of_work(engine) as session:
        session.delete(session.get(User, member_id))

    assert _refused_after(client, post, 401) <= REVOCATION_BOUND_SECONDS + 0.5
    with engine.connect() as connection:
        # Not an organization-wide key now that its user_id is NULL: revoked.
        revoked = connection.execute(
            sa.text("SELECT revoked_at FROM api_keys WHERE id = :id"), {"id": created.key.id}
        ).scalar_one()
    assert revoked is not None


def test_project_of_another_organization_is_403(
    client: httpx.Client, engine: Engine, tenant: Tenant
) -> None:
    other = make_tenant(engine)
    response = client.post(
        "/v1/events", json=event(project_id=str(other.project_id)), headers=bearer(tenant.key)
    )
    assert response.status_code == 403
    assert response.json()["error"]["details"][0]["index"] == 0


def test_project_scoped_key_cannot_write_another_project(
    client: httpx.Client, engine: Engine, tenant: Tenant
) -> None:
    from shared.models import Organization
    from tests import factories

    with unit_of_work(engine) as session:
        organization = session.get(Organization, tenant.organization_id)
        assert organization is not None
        sibling = factories.make_project(session, organization)
    response = client.post(
        "/v1/events", json=event(project_id=str(sibling.id)), headers=bearer(tenant.scoped_key)
    )
    assert response.status_code == 403
    allowed = client.post(
        "/v1/events", json=event(project_id=str(sibling.id)), headers=bearer(tenant.key)
    )
    assert allowed.status_code == 202


def test_body_over_one_mebibyte_is_413(client: httpx.Client, tenant: Tenant) -> None:
    body = b'{"events": [' + b" " * MAX_BODY_BYTES + b"]}"
    response = client.post(
        "/v1/events",
        content=body,
        headers={**bearer(tenant.key), "Content-Type": "application/json"},
    )
    assert response.status_code == 413


def test_non_json_content_type_is_415(client: httpx.Client, tenant: Tenant) -> None:
    response = client.post(
        "/v1/events",
        content=b"id=1&metric=x",
        headers={**bearer(tenant.key), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 415


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"events": []}', "1 to 1000"),
        (b'{"id": "a", "metric": "Bad Metric"}', "metric"),
        (b'{"id": "a", "metric": "m", "quantity": "NaN"}', "quantity"),
        (b'{"id": "a", "metric": "m", "timestamp": "2026-11-24T10:00:00"}', "time zone"),
        (b'{"id": "a", "metric": "m", "timestamp": "2026-11-24 10:00:00Z"}', "RFC 3339"),
        (b'{"id": "a", "metric": "m", "quantity": "1e3"}', "no sign, exponent or spaces"),
        (b'{"id": "a", "metric": "m", "properties": false}', "properties"),
        (
            b'{"id": "a", "metric": "m", "project_id": "{00000000-0000-0000-0000-000000000001}"}',
            "project_id",
        ),
    ],
    ids=[
        "malformed",
        "empty-batch",
        "metric",
        "nan",
        "naive-timestamp",
        "space-separated-timestamp",
        "exponent-in-a-quantity-string",
        "properties-false",
        "braced-project-id",
    ],
)
def test_invalid_body_is_422_with_reason(
    client: httpx.Client, tenant: Tenant, body: bytes, reason: str
) -> None:
    response = client.post(
        "/v1/events",
        content=body,
        headers={**bearer(tenant.key), "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert reason in response.text


def test_batch_of_1001_events_is_422(client: httpx.Client, tenant: Tenant) -> None:
    events = [event(f"e{i}") for i in range(1001)]
    response = client.post("/v1/events", json={"events": events}, headers=bearer(tenant.key))
    assert response.status_code == 422


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [
        (timedelta(minutes=4), True),
        (timedelta(minutes=6), False),
        (-timedelta(days=34), True),
        (-timedelta(days=36), False),
    ],
    ids=["4min-ahead", "6min-ahead", "34days-old", "36days-old"],
)
def test_timestamp_window_is_five_minutes_ahead_to_the_lateness_horizon(
    client: httpx.Client, tenant: Tenant, offset: timedelta, accepted: bool
) -> None:
    stamp = rfc3339(datetime.now(UTC) + offset)
    response = client.post("/v1/events", json=event(timestamp=stamp), headers=bearer(tenant.key))
    assert response.status_code == (202 if accepted else 422), response.text


def test_over_the_rate_limit_is_429_with_retry_after(client: httpx.Client, tenant: Tenant) -> None:
    # In parallel, so that the requests outrun the refill (20/s) however long one read takes on a
    # loaded machine; one after another, 80 reads at over 25 ms each never emptied the bucket.
    def read(_: int) -> tuple[int, str | None]:
        response = client.get("/v1/usage", headers=bearer(tenant.key))
        return response.status_code, response.headers.get("Retry-After")

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(read, range(240)))
    statuses = [status for status, _ in answers]
    assert set(statuses) == {200, 429}, statuses
    assert statuses.count(200) >= 40  # the burst
    assert all(after is not None and int(after) >= 1 for status, after in answers if status == 429)


def test_usage_is_read_for_the_keys_own_organization_only(
    client: httpx.Client, engine: Engine, tenant: Tenant
) -> None:
    other = make_tenant(engine)
    hour = datetime(2026, 11, 20, 10, tzinfo=UTC)
    with unit_of_work(engine) as session:
        record_usage(
            session,
            [
                UsageDelta(
                    tenant.organization_id,
                    tenant.project_id,
                    tenant.key_id,
                    "api_calls",
                    hour,
                    3600,
                    Decimal("2.50"),
                    2,
                ),
                UsageDelta(
                    tenant.organization_id,
                    None,
                    tenant.key_id,
                    "api_calls",
                    hour + timedelta(hours=1),
                    3600,
                    Decimal("1"),
                    1,
                ),
                UsageDelta(
                    tenant.organization_id, None, None, "storage_gb", hour, 3600, Decimal("7"), 1
                ),
                UsageDelta(
                    other.organization_id, None, None, "api_calls", hour, 3600, Decimal("100"), 1
                ),
            ],
        )
    params = {"from": rfc3339(hour), "to": rfc3339(hour + timedelta(days=1)), "granularity": "day"}
    response = client.get("/v1/usage", params=params, headers=bearer(tenant.key))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["granularity"] == "day"
    assert body["data"] == [
        {
            "start": "2026-11-20T00:00:00Z",
            "metric": "api_calls",
            "quantity": "3.5",
            "event_count": 3,
        },
        {
            "start": "2026-11-20T00:00:00Z",
            "metric": "storage_gb",
            "quantity": "7",
            "event_count": 1,
        },
    ]
    by_project = client.get(
        "/v1/usage",
        params={**params, "granularity": "hour", "group_by": "project", "metric": "api_calls"},
        headers=bearer(tenant.key),
    ).json()["data"]
    assert [(r["start"], r["project_id"], r["quantity"]) for r in by_project] == [
        ("2026-11-20T10:00:00Z", str(tenant.project_id), "2.5"),
        ("2026-11-20T11:00:00Z", None, "1"),
    ]
    theirs = client.get("/v1/usage", params=params, headers=bearer(other.key)).json()["data"]
    assert [r["quantity"] for r in theirs] == ["100"]


USAGE_HOUR = datetime(2026, 11, 20, 10, tzinfo=UTC)
USAGE_RANGE = {
    "from": rfc3339(USAGE_HOUR),
    "to": rfc3339(USAGE_HOUR + timedelta(hours=1)),
    "granularity": "hour",
}


def _record(engine: Engine, organization_id: uuid.UUID, rows: list[tuple[object, object, str]]):
    """(project id, key id, quantity) windows at USAGE_HOUR."""
    with unit_of_work(engine) as session:
        record_usage(
            session,
            [
                UsageDelta(
                    organization_id, project, key, "api_calls", USAGE_HOUR, 3600, Decimal(q), 1
                )
                for project, key, q in rows
            ],
        )


def _usage(client: httpx.Client, key: str, group_by: str) -> set[tuple[object, str]]:
    response = client.get(
        "/v1/usage", params={**USAGE_RANGE, "group_by": group_by}, headers=bearer(key)
    )
    assert response.status_code == 200, response.text
    column = "project_id" if group_by == "project" else "api_key_id"
    return {(row[column], row["quantity"]) for row in response.json()["data"]}


def test_project_key_reads_only_its_own_projects_usage(
    client: httpx.Client, engine: Engine, tenant: Tenant
) -> None:
    with unit_of_work(engine) as session:
        organization = session.get(Organization, tenant.organization_id)
        assert organization is not None
        other_project = factories.make_project(session, organization).id
    _record(
        engine,
        tenant.organization_id,
        [
            (tenant.project_id, tenant.scoped_key_id, "1"),
            (tenant.project_id, tenant.key_id, "2"),
            (other_project, tenant.key_id, "4"),
            (None, tenant.key_id, "8"),
        ],
    )
    mine = str(tenant.project_id)

    assert _usage(client, tenant.scoped_key, "project") == {(mine, "3")}
    assert _usage(client, tenant.scoped_key, "api_key") == {
        (str(tenant.scoped_key_id), "1"),
        (str(tenant.key_id), "2"),
    }
    assert _usage(client, tenant.key, "project") == {
        (mine, "3"),
        (str(other_project), "4"),
        (None, "8"),
    }


def test_user_keys_read_what_their_members_role_may_see(
    client: httpx.Client, engine: Engine, tenant: Tenant
) -> None:
    with unit_of_work(engine) as session:
        organization = session.get(Organization, tenant.organization_id)
        assert organization is not None
        member = factories.add_member(session, organization, Role.MEMBER)
        billing = factories.add_member(session, organization, Role.BILLING)
        member_key = factories.make_api_key(session, organization, user=member)
        billing_key = factories.make_api_key(session, organization, user=billing)
        billing_id = billing.id
    _record(
        engine,
        tenant.organization_id,
        [
            (None, member_key.key.id, "1"),
            (tenant.project_id, member_key.key.id, "2"),
            (None, billing_key.key.id, "4"),
            (None, tenant.key_id, "8"),
        ],
    )
    everything = {
        (str(member_key.key.id), "3"),
        (str(billing_key.key.id), "4"),
        (str(tenant.key_id), "8"),
    }

    # A plain member sees what its own keys recorded; billing (like owners and admins) sees all.
    assert _usage(client, member_key.plaintext, "api_key") == {(str(member_key.key.id), "3")}
    assert _usage(client, billing_key.plaintext, "api_key") == everything
    assert _usage(client, tenant.key, "api_key") == everything
    # The role is read at each request: demoted, the billing user sees only its own keys.
    with unit_of_work(engine) as session:
        change_role(
            session, tenant.organization_id, actor_id=None, user_id=billing_id, role=Role.MEMBER
        )
    assert _usage(client, billing_key.plaintext, "api_key") == {(str(billing_key.key.id), "4")}


def test_usage_with_bad_parameters_is_422(client: httpx.Client, tenant: Tenant) -> None:
    for params in (
        {"from": "yesterday"},
        {"granularity": "week"},
        # Any other group_by name is a dimension (DESIGN.md 4); an empty one, or one named
        # twice, is refused, as is a filter without a dimension name.
        {"group_by": "region,"},
        [("group_by", "region"), ("group_by", "region")],
        {"filter[]": "eu"},
        # An empty value is a bad value, not an absent one.
        {"metric": ""},
        {"group_by": ""},
        {"from": ""},
        # A parameter given twice is ambiguous.
        [("granularity", "day"), ("granularity", "hour")],
    ):
        response = client.get("/v1/usage", params=params, headers=bearer(tenant.key))
        assert response.status_code == 422, params


def test_usage_by_a_dimension_no_meter_keeps_is_422_naming_it(
    client: httpx.Client, tenant: Tenant
) -> None:
    # A typo in a dimension is refused by name, not answered with null groups or no rows.
    unknown = f"dim_{uuid.uuid4().hex[:8]}"
    for params, field in (
        ({"group_by": unknown}, "group_by"),
        ({f"filter[{unknown}]": "eu"}, f"filter[{unknown}]"),
        ({"group_by": unknown, "metric": "api_calls"}, "group_by"),
    ):
        response = client.get("/v1/usage", params=params, headers=bearer(tenant.key))
        assert response.status_code == 422, params
        details = response.json()["error"]["details"]
        named = f"{field}: {unknown!r} is no dimension of"
        assert any(d.startswith(named) for d in details), details
    # The groups of their own are no dimensions and stay accepted.
    response = client.get("/v1/usage", params={"group_by": "project"}, headers=bearer(tenant.key))
    assert response.status_code == 200


def test_health_readiness_metrics_and_openapi_answer(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"database": "ok", "broker": "ok"}
    metrics = client.get("/metrics").text
    assert "meterline_ingest_requests_total" in metrics
    assert "meterline_ingest_publish_seconds_bucket" in metrics
    document = client.get("/openapi.json").json()
    assert set(document["paths"]) >= {"/v1/events", "/v1/usage"}


def test_logs_and_bodies_contain_no_key_or_pepper(
    client: httpx.Client, server: IngestServer, tenant: Tenant, service_env: dict[str, str]
) -> None:
    pepper = service_env["METERLINE_API_KEY_PEPPER"]
    bodies = [
        client.post("/v1/events", json=event(), headers=bearer(tenant.key)).text,
        client.post(
            "/v1/events", json={"events": [{"id": tenant.key}]}, headers=bearer(tenant.key)
        ).text,
        client.post("/v1/events", json=event(), headers=bearer(tenant.key + "x")).text,
        client.get("/v1/usage", params={"from": tenant.key}, headers=bearer(tenant.key)).text,
    ]
    # Unknown query parameters are echoed by name only; make one the key itself.
    bodies.append(
        client.get("/v1/usage", params={tenant.key: "1"}, headers=bearer(tenant.key)).text
    )
    time.sleep(0.5)
    logs = server.logs()
    assert logs  # the service did log
    for text in [*bodies, logs]:
        assert tenant.key not in text
        assert pepper not in text


def test_unknown_project_reads_as_forbidden_not_missing(
    client: httpx.Client, tenant: Tenant
) -> None:
    response = client.post(
        "/v1/events", json=event(project_id=str(uuid.uuid4())), headers=bearer(tenant.key)
    )
    assert response.status_code == 403


def test_key_usage_count_and_last_used_are_flushed_in_the_background(
    client: httpx.Client, engine: Engine, tenant: Tenant
) -> None:
    from shared.models import ApiKey

    for _ in range(3):
        assert (
            client.post("/v1/events", json=event(), headers=bearer(tenant.key)).status_code == 202
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with unit_of_work(engine) as session:
            key = session.get(ApiKey, tenant.key_id)
            assert key is not None
            count, last_used = key.usage_count, key.last_used_at
        if count >= 3:
            break
        time.sleep(0.2)
    assert count == 3
    assert last_used is not None
