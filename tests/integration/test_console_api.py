"""The admin API: every route answers for an admin, refuses without a token (401), refuses a
viewer's change (403), names what is wrong (404, 409, 422), refuses a session change without its
CSRF token, and audits every change. Real PostgreSQL and Kafka; the app in process."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from services.aggregator.replay_runs import list_replay_runs
from services.billing import invoice_repository
from services.billing.invoices import Invoice, InvoiceLine
from services.console.app import create_app, operations
from services.console.routing import API_PREFIX
from shared.db import unit_of_work
from shared.events import decode_envelope
from shared.meter_usage import MeterTotal, MeterUsage, record_meter_usage
from shared.meters import MeterDefinition, apply_meters, dimensions_key
from shared.models import (
    ApiKey,
    AuditEntry,
    BillingRun,
    Meter,
    MeterWindow,
    OperatorRole,
    Plan,
    ReconciliationMismatch,
    ReplayRun,
    Subscription,
    SubscriptionPhase,
)
from shared.operators import revoke_operator
from shared.settings import Settings
from shared.topics import ensure_topics
from shared.usage import UsageDelta, record_usage
from tests import factories
from tests.aggregator_support import envelope_bytes, event
from tests.console_support import OperatorToken, bearer, login, make_operator, produce_dead_letter

URL = "https://testserver"


@pytest.fixture(scope="module")
def app_settings(make_settings_module: Settings) -> Settings:
    return make_settings_module


@pytest.fixture(scope="module")
def make_settings_module(service_env: dict[str, str]) -> Settings:
    import os

    from shared.settings import load_settings

    saved = dict(os.environ)
    os.environ.update({k: v for k, v in service_env.items() if k.isupper()})
    os.environ["METERLINE_TOPIC_PREFIX"] = f"console{uuid.uuid4().hex[:6]}"
    # Nothing listens here: the health probes must say so, fast.
    os.environ["METERLINE_CONSOLE_INGEST_URLS"] = "http://127.0.0.1:9"
    os.environ["METERLINE_CONSOLE_AGGREGATOR_URLS"] = "http://127.0.0.1:9"
    try:
        return load_settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def client(app_settings: Settings) -> Iterator[TestClient]:
    ensure_topics(app_settings)
    with TestClient(
        create_app(app_settings, sample=False, configure_logs=False), base_url=URL
    ) as c:
        yield c


@pytest.fixture(scope="module")
def admin(engine: Engine) -> OperatorToken:
    return make_operator(engine, OperatorRole.ADMIN)


@pytest.fixture(scope="module")
def viewer(engine: Engine) -> OperatorToken:
    return make_operator(engine, OperatorRole.VIEWER)


@pytest.fixture
def tenant(engine: Engine) -> dict[str, object]:
    """A committed organization with a project, a key, a plan, a subscription and a mismatch."""
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session)
        project = factories.make_project(session, organization)
        key = factories.make_api_key(session, organization, project=project)
        plan = factories.make_plan(session)
        subscription = factories.make_subscription(session, organization, plan)
        mismatch = ReconciliationMismatch(
            subscription_id=subscription.id,
            kind="price_differs",
            ours="4900",
            theirs="5900",
            amount=Decimal(1000),
            resolved=False,
        )
        session.add(mismatch)
        session.flush()
        invoice = _invoice(subscription)
        invoice_repository.save_invoices(
            session.connection(),
            invoice_repository.invoice_rows([invoice], new=frozenset({invoice.id})),
        )
        return {
            "organization_id": organization.id,
            "slug": organization.slug,
            "name": organization.name,
            "project_id": project.id,
            "key_id": key.key.id,
            "prefix": key.key.prefix,
            "mismatch_id": mismatch.id,
            "subscription_id": subscription.id,
            "plan_key": plan.key,
            "invoice_id": invoice.id,
        }


def _invoice(subscription: Subscription) -> Invoice:
    """A final invoice of the subscription's period: a flat fee and one usage line."""
    return Invoice(
        id=uuid.uuid4(),
        organization_id=subscription.organization_id,
        subscription_id=subscription.id,
        period_start=subscription.current_period_start,
        period_end=subscription.current_period_end,
        currency="usd",
        status="final",
        flat_amount=4900,
        total=4900 + 1250,
        finalized_at=subscription.current_period_end,
        pricing=None,
        lines=(
            InvoiceLine("flat", None, Decimal(0), Decimal(0), 4900, description="Plan fee"),
            InvoiceLine("usage", "api_calls", Decimal("1250.5"), Decimal("1250"), 1250),
        ),
    )


def _path(path: str, tenant: dict[str, object] | None = None) -> str:
    values = {
        "organization": str(tenant["slug"]) if tenant else "x",
        "key": str(tenant["prefix"]) if tenant else "x",
        "mismatch": str(tenant["mismatch_id"]) if tenant else str(uuid.uuid4()),
        "subscription": str(tenant["subscription_id"]) if tenant else str(uuid.uuid4()),
        "invoice": str(tenant["invoice_id"]) if tenant else str(uuid.uuid4()),
        "letter": "0:0",
    }
    for name, value in values.items():
        path = path.replace("{" + name + "}", value)
    return API_PREFIX + path


def _audit(engine: Engine, action: str, target_id: object) -> list[AuditEntry]:
    with unit_of_work(engine) as session:
        return list(
            session.scalars(
                sa.select(AuditEntry).where(
                    AuditEntry.action == action, AuditEntry.target_id == str(target_id)
                )
            )
        )


# --- the document -------------------------------------------------------------------------


def test_openapi_documents_every_admin_route_and_nothing_else(client: TestClient) -> None:
    document = client.get(f"{API_PREFIX}/openapi.json").json()
    documented = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    served = {(op.method, API_PREFIX + op.path) for op in operations()}
    assert documented == served
    assert document["components"]["securitySchemes"]["operatorToken"]["scheme"] == "bearer"


def test_every_change_is_documented_with_403(client: TestClient) -> None:
    document = client.get(f"{API_PREFIX}/openapi.json").json()
    for op in operations():
        responses = document["paths"][API_PREFIX + op.path][op.method.lower()]["responses"]
        assert ("403" in responses) == op.change, op.name


# --- 401 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", operations(), ids=lambda op: op.name)
def test_every_route_refuses_a_request_without_a_token(client: TestClient, op) -> None:
    response = client.request(op.method, _path(op.path), json={} if op.body else None)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "unauthenticated"


def test_unknown_malformed_and_revoked_tokens_get_the_same_401(
    client: TestClient, engine: Engine
) -> None:
    revoked = make_operator(engine, OperatorRole.ADMIN)
    with unit_of_work(engine) as session:
        revoke_operator(session, revoked.id, now=datetime.now(UTC))
    for token in ("mlop_nope", revoked.token, revoked.token[:-1] + "a", "ml_live_x"):
        response = client.get(f"{API_PREFIX}/me", headers=bearer(token))
        assert response.status_code == 401, token
        assert response.json() == {
            "error": {"code": "unauthenticated", "message": "unknown or revoked operator token"}
        }
        assert token not in response.text


def test_a_scheme_other_than_bearer_is_401(client: TestClient, admin: OperatorToken) -> None:
    response = client.get(f"{API_PREFIX}/me", headers={"Authorization": f"Basic {admin.token}"})
    assert response.status_code == 401


# --- 403 for viewers ------------------------------------------------------------------------


@pytest.mark.parametrize("op", [o for o in operations() if o.change], ids=lambda op: op.name)
def test_a_viewer_cannot_change_anything(
    client: TestClient, engine: Engine, viewer: OperatorToken, tenant: dict[str, object], op
) -> None:
    body = (
        {
            "plans": [{"key": f"v-{uuid.uuid4().hex[:6]}"}],
            "note": "n",
            "organization": tenant["slug"],
            "plan": tenant["plan_key"],
        }
        if op.body
        else None
    )
    response = client.request(
        op.method, _path(op.path, tenant), json=body, headers=bearer(viewer.token)
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    with unit_of_work(engine) as session:
        assert session.get(ApiKey, tenant["key_id"]).revoked_at is None
        assert session.get(ReconciliationMismatch, tenant["mismatch_id"]).resolved is False
        assert session.get(Subscription, tenant["subscription_id"]).status == "active"
        entries = session.scalars(
            sa.select(AuditEntry).where(AuditEntry.operator_id == viewer.id)
        ).all()
    assert entries == []


@pytest.mark.parametrize("op", [o for o in operations() if not o.change], ids=lambda op: op.name)
def test_a_viewer_reads_every_read_route(
    client: TestClient, viewer: OperatorToken, tenant: dict[str, object], op
) -> None:
    response = client.get(_path(op.path, tenant), headers=bearer(viewer.token))
    assert response.status_code == 200, response.text


def test_me_says_who_and_what_role(
    client: TestClient, admin: OperatorToken, viewer: OperatorToken
) -> None:
    assert client.get(f"{API_PREFIX}/me", headers=bearer(admin.token)).json()["can_change"]
    me = client.get(f"{API_PREFIX}/me", headers=bearer(viewer.token)).json()
    assert me == {"id": str(viewer.id), "name": viewer.name, "role": "viewer", "can_change": False}


# --- organizations and keys -----------------------------------------------------------------


def test_search_finds_an_organization_by_part_of_its_slug(
    client: TestClient, admin: OperatorToken, tenant: dict[str, object]
) -> None:
    part = str(tenant["slug"])[4:]
    found = client.get(
        f"{API_PREFIX}/organizations", params={"q": part}, headers=bearer(admin.token)
    ).json()
    assert [o["slug"] for o in found["items"]] == [tenant["slug"]]
    assert found["total"] == 1


def test_search_treats_like_wildcards_as_text(client: TestClient, admin: OperatorToken) -> None:
    found = client.get(
        f"{API_PREFIX}/organizations", params={"q": "%_"}, headers=bearer(admin.token)
    ).json()
    assert found["total"] == 0


def test_organization_detail_lists_members_projects_and_keys_by_prefix(
    client: TestClient, admin: OperatorToken, tenant: dict[str, object]
) -> None:
    detail = client.get(_path("/organizations/{organization}", tenant), headers=bearer(admin.token))
    body = detail.json()
    assert body["organization"]["id"] == str(tenant["organization_id"])
    assert [p["id"] for p in body["projects"]] == [str(tenant["project_id"])]
    assert [k["prefix"] for k in body["api_keys"]] == [tenant["prefix"]]
    assert len(body["members"]) == 1
    assert "key_hash" not in detail.text


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"q": "a\x00b"}, "q"),
        ({"q": "x" * 501}, "q"),
        ({"unknown": "1"}, "unknown"),
    ],
)
def test_bad_query_parameters_are_422_naming_them(
    client: TestClient, admin: OperatorToken, params: dict[str, str], problem: str
) -> None:
    response = client.get(f"{API_PREFIX}/organizations", params=params, headers=bearer(admin.token))
    assert response.status_code == 422
    assert problem in response.json()["error"]["message"]


def test_unknown_organization_is_404(client: TestClient, admin: OperatorToken) -> None:
    for reference in ("no-such-org", str(uuid.uuid4())):
        response = client.get(
            f"{API_PREFIX}/organizations/{reference}", headers=bearer(admin.token)
        )
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def test_unknown_route_is_a_json_404(client: TestClient, admin: OperatorToken) -> None:
    response = client.get(f"{API_PREFIX}/nothing-here", headers=bearer(admin.token))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_revoking_a_key_revokes_it_and_audits_who(
    client: TestClient, engine: Engine, admin: OperatorToken, tenant: dict[str, object]
) -> None:
    response = client.post(_path("/api-keys/{key}/revoke", tenant), headers=bearer(admin.token))
    assert response.status_code == 200
    assert response.json()["state"] == "revoked"
    with unit_of_work(engine) as session:
        assert session.get(ApiKey, tenant["key_id"]).revoked_at is not None
    [entry] = _audit(engine, "api_key.revoke", tenant["key_id"])
    assert (entry.actor, entry.operator_id) == (admin.name, admin.id)
    assert entry.details["prefix"] == tenant["prefix"]


def test_revoking_a_platform_key_audits_no_organization(
    client: TestClient, engine: Engine, admin: OperatorToken
) -> None:
    with unit_of_work(engine) as session:
        created = factories.make_platform_key(session)
    response = client.post(
        f"{API_PREFIX}/api-keys/{created.key.id}/revoke", headers=bearer(admin.token)
    )
    assert response.status_code == 200
    [entry] = _audit(engine, "api_key.revoke", created.key.id)
    assert entry.details["organization_id"] is None
    assert entry.details["platform"] is True


def test_revoking_a_platform_key_from_a_page_returns_to_the_organizations(
    browser: tuple[TestClient, str], engine: Engine
) -> None:
    c, csrf = browser
    with unit_of_work(engine) as session:
        created = factories.make_platform_key(session)
    page = c.post(f"/api-keys/{created.key.id}/revoke", data={"csrf_token": csrf},
                  headers={"origin": URL})  # fmt: skip
    assert page.status_code == 303
    assert page.headers["location"].split("?")[0] == "/organizations"
    with unit_of_work(engine) as session:
        assert session.get(ApiKey, created.key.id).revoked_at is not None


def test_revoking_an_unknown_key_is_404(client: TestClient, admin: OperatorToken) -> None:
    response = client.post(f"{API_PREFIX}/api-keys/nokey123/revoke", headers=bearer(admin.token))
    assert response.status_code == 404


# --- plans ----------------------------------------------------------------------------------


def test_applying_plans_creates_then_leaves_them_unchanged(
    client: TestClient, engine: Engine, admin: OperatorToken
) -> None:
    key = f"plan-{uuid.uuid4().hex[:6]}"
    document = {"plans": [{"key": key, "name": "Team", "price_monthly": 1900}]}
    first = client.post(f"{API_PREFIX}/plans/apply", json=document, headers=bearer(admin.token))
    again = client.post(f"{API_PREFIX}/plans/apply", json=document, headers=bearer(admin.token))
    assert first.json() == {"plans": [{"key": key, "result": "created"}]}
    assert again.json() == {"plans": [{"key": key, "result": "unchanged"}]}
    listed = client.get(f"{API_PREFIX}/plans", headers=bearer(admin.token)).json()["items"]
    assert any(p["key"] == key and p["price_monthly"] == 1900 for p in listed)
    assert len(_audit(engine, "plans.apply", key)) == 1  # the unchanged apply changed nothing


def test_an_invalid_plan_is_422_naming_each_field_and_writes_nothing(
    client: TestClient, engine: Engine, admin: OperatorToken
) -> None:
    key = f"plan-{uuid.uuid4().hex[:6]}"
    document = {
        "plans": [
            {
                "key": key,
                "price_monthly": 12.5,
                "features": {"metered": {"api_calls": {"model": "per_unit", "unit_amount": 0.1}}},
            }
        ]
    }
    response = client.post(f"{API_PREFIX}/plans/apply", json=document, headers=bearer(admin.token))
    assert response.status_code == 422
    details = response.json()["error"]["details"]
    assert any(d.startswith("plans[0].price_monthly:") for d in details)
    assert any(d.startswith("plans[0].features.metered.api_calls.unit_amount:") for d in details)
    with unit_of_work(engine) as session:
        assert session.scalar(sa.select(Plan).where(Plan.key == key)) is None


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"not json", 422),
        (b"[1, 2]", 422),
        (b'{"plans": [{"key": "a", "name": "x\\u0000y"}]}', 422),
        (b'{"plans": "' + b"x" * (1024 * 1024 + 10) + b'"}', 413),
    ],
)
def test_a_plan_body_that_cannot_be_read_is_refused(
    client: TestClient, admin: OperatorToken, content: bytes, status: int
) -> None:
    response = client.post(
        f"{API_PREFIX}/plans/apply",
        content=content,
        headers={**bearer(admin.token), "content-type": "application/json"},
    )
    assert response.status_code == status


# --- usage ----------------------------------------------------------------------------------


def test_usage_by_organization_and_over_time(
    client: TestClient, engine: Engine, admin: OperatorToken, tenant: dict[str, object]
) -> None:
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    with unit_of_work(engine) as session:
        record_usage(
            session,
            [
                UsageDelta(
                    tenant["organization_id"],
                    tenant["project_id"],
                    tenant["key_id"],
                    "api_calls",
                    start + timedelta(hours=h),
                    3600,
                    Decimal("2.5"),
                    2,
                )
                for h in range(3)
            ],
        )
    over_time = client.get(
        _path("/organizations/{organization}/usage", tenant),
        params={"group_by": "project", "granularity": "hour"},
        headers=bearer(admin.token),
    ).json()
    assert [(r["quantity"], r["project_id"]) for r in over_time["data"]] == [
        ("2.5", str(tenant["project_id"]))
    ] * 3
    overview = client.get(
        f"{API_PREFIX}/usage", params={"metric": "api_calls", "limit": "200"},
        headers=bearer(admin.token),
    ).json()  # fmt: skip
    ours = [r for r in overview["items"] if r["organization_id"] == str(tenant["organization_id"])]
    assert [(r["quantity"], r["event_count"]) for r in ours] == [("7.5", 6)]


def test_the_overview_widens_a_range_to_whole_days_and_sums_exactly_what_usage_records_hold(
    client: TestClient, engine: Engine, admin: OperatorToken, tenant: dict[str, object]
) -> None:
    """From 5:00 on 3 January to 7:00 on 1 March 2005 is the days [3 January, 2 March): read as
    January less its first two days, February and a day of March."""
    hours = [
        datetime(2005, 1, 2, 23, tzinfo=UTC),  # the day before: out
        datetime(2005, 1, 3, 1, tzinfo=UTC),  # before `from`, on its day: in
        datetime(2005, 1, 31, 23, tzinfo=UTC),
        datetime(2005, 2, 14, 12, tzinfo=UTC),
        datetime(2005, 3, 1, 22, tzinfo=UTC),  # after `to`, on its day: in
        datetime(2005, 3, 2, 0, tzinfo=UTC),  # the day after: out
    ]
    organization_id = tenant["organization_id"]
    with unit_of_work(engine) as session:
        record_usage(
            session,
            [
                UsageDelta(organization_id, None, None, "api_calls", hour, 3600,
                           Decimal(f"1.{n}25"), n + 1)
                for n, hour in enumerate(hours)
            ],
        )  # fmt: skip
        expected = session.execute(
            sa.text(
                "SELECT sum(quantity), sum(event_count) FROM usage_records"
                " WHERE organization_id = :org AND window_start >= '2005-01-03T00:00:00Z'"
                " AND window_start < '2005-03-02T00:00:00Z'"
            ),
            {"org": organization_id},
        ).one()

    overview = client.get(
        f"{API_PREFIX}/usage",
        params={"from": "2005-01-03T05:00:00Z", "to": "2005-03-01T07:00:00Z", "limit": "200"},
        headers=bearer(admin.token),
    ).json()

    assert (overview["from"], overview["to"]) == (
        "2005-01-03T00:00:00+00:00",
        "2005-03-02T00:00:00+00:00",
    )
    ours = [r for r in overview["items"] if r["organization_id"] == str(organization_id)]
    assert [(r["quantity"], r["event_count"]) for r in ours] == [
        (str(expected[0]), int(expected[1]))
    ]
    assert (Decimal(ours[0]["quantity"]), ours[0]["event_count"]) == (Decimal("5.1"), 14)


@pytest.mark.parametrize(
    "params",
    [
        {"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
        {"from": "2026-01-01T00:00:00Z", "to": "2026-03-01T00:00:00Z", "granularity": "hour"},
        {"from": "yesterday"},
        {"granularity": "week"},
        {"group_by": "colour"},
    ],
)
def test_bad_usage_ranges_are_422(
    client: TestClient, admin: OperatorToken, tenant: dict[str, object], params: dict[str, str]
) -> None:
    response = client.get(
        _path("/organizations/{organization}/usage", tenant), params=params,
        headers=bearer(admin.token),
    )  # fmt: skip
    assert response.status_code == 422


# --- meters, and usage by dimension --------------------------------------------------------


@pytest.fixture
def metered(engine: Engine, tenant: dict[str, object]) -> Iterator[dict[str, Any]]:
    """A meter of its own metric (max, by region and tier) and its hourly windows for the
    tenant two days ago: 10:00 eu 5 and us 7, 11:00 eu 3. No usage_records at all."""
    tag = uuid.uuid4().hex[:8]
    metric, region, tier = f"m{tag}.seats", f"region_{tag}", f"tier_{tag}"
    day = (datetime.now(UTC) - timedelta(days=2)).replace(hour=0, minute=0, second=0, microsecond=0)
    ten, eleven = day + timedelta(hours=10), day + timedelta(hours=11)
    org, project, key = tenant["organization_id"], tenant["project_id"], tenant["key_id"]

    def window(at: datetime, where: str, quantity: int) -> Any:
        values = dimensions_key({region: where, tier: "pro"})
        return (org, project, key, metric, values, at), MeterTotal.of(Decimal(quantity), at, tag)

    windows = dict([window(ten, "eu", 5), window(ten, "us", 7), window(eleven, "eu", 3)])
    with unit_of_work(engine) as session:
        apply_meters(session, [MeterDefinition(metric, "max", (region, tier))])
        record_meter_usage(session.connection(), MeterUsage(windows, set()), 3600)
    yield {
        "metric": metric, "region": region, "tier": tier, "day": day, "ten": ten,
        "eleven": eleven,
    }  # fmt: skip
    with unit_of_work(engine) as session:
        session.execute(sa.delete(MeterWindow).where(MeterWindow.metric == metric))
        session.execute(sa.delete(Meter).where(Meter.metric == metric))


def test_meters_are_listed_for_a_viewer_and_refused_without_a_token(
    client: TestClient, viewer: OperatorToken, metered: dict[str, Any]
) -> None:
    assert client.get(f"{API_PREFIX}/meters").status_code == 401
    response = client.get(f"{API_PREFIX}/meters", headers=bearer(viewer.token))
    assert response.status_code == 200, response.text
    ours = [m for m in response.json()["items"] if m["metric"] == metered["metric"]]
    assert ours == [
        {
            "metric": metered["metric"],
            "aggregation": "max",
            "dimensions": [metered["region"], metered["tier"]],
            "property": None,
            "value_property": None,
        }
    ]


def _dimension_usage(
    client: TestClient,
    token: str,
    tenant: dict[str, object],
    metered: dict[str, Any],
    **params: str,
) -> Any:
    day = metered["day"]
    response = client.get(
        _path("/organizations/{organization}/usage", tenant),
        params={
            "metric": metered["metric"],
            "from": day.isoformat(),
            "to": (day + timedelta(days=1)).isoformat(),
            **params,
        },
        headers=bearer(token),
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_organization_usage_by_dimension_is_read_through_the_meter(
    client: TestClient, viewer: OperatorToken, tenant: dict[str, object], metered: dict[str, Any]
) -> None:
    region, tier = metered["region"], metered["tier"]
    ten, eleven = metered["ten"], metered["eleven"]

    def rows(document: Any) -> list[tuple[datetime, str | None, str]]:
        return [
            (datetime.fromisoformat(r["start"]), (r["dimensions"] or {}).get(region), r["quantity"])
            for r in document["data"]
        ]

    def starts(document: Any) -> list[tuple[datetime, str]]:
        return [(datetime.fromisoformat(r["start"]), r["quantity"]) for r in document["data"]]

    hourly = _dimension_usage(client, viewer.token, tenant, metered, dimension=region)
    assert hourly["dimension"] == region
    assert rows(hourly) == [(ten, "eu", "5"), (ten, "us", "7"), (eleven, "eu", "3")]
    # A day's max is the greatest of its hours, not their sum.
    daily = _dimension_usage(
        client, viewer.token, tenant, metered, dimension=region, granularity="day"
    )
    day = metered["day"]
    assert rows(daily) == [(day, "eu", "5"), (day, "us", "7")]
    # Without a dimension, each hour is the max over both regions.
    overall = _dimension_usage(client, viewer.token, tenant, metered)
    assert starts(overall) == [(ten, "7"), (eleven, "3")]
    only_eu = _dimension_usage(client, viewer.token, tenant, metered, **{f"filter[{region}]": "eu"})
    assert only_eu["filters"] == {region: "eu"}
    assert starts(only_eu) == [(ten, "5"), (eleven, "3")]
    by_tier = _dimension_usage(
        client, viewer.token, tenant, metered, dimension=tier, **{f"filter[{region}]": "us"}
    )
    assert [(r["dimensions"], r["quantity"]) for r in by_tier["data"]] == [({tier: "pro"}, "7")]


def test_a_dimension_or_filter_no_meter_keeps_is_422_naming_it(
    client: TestClient, admin: OperatorToken, tenant: dict[str, object], metered: dict[str, Any]
) -> None:
    path = _path("/organizations/{organization}/usage", tenant)
    colour = f"colour_{uuid.uuid4().hex[:8]}"
    cases = [
        ({"dimension": colour}, f"dimension: '{colour}' is no dimension of any meter"),
        (
            {"metric": metered["metric"], f"filter[{colour}]": "red"},
            f"filter[{colour}]: '{colour}' is no dimension of the meter of "
            f"'{metered['metric']}' (known: {metered['region']}, {metered['tier']})",
        ),
        # A metric without a meter has no dimensions, whatever other meters keep.
        (
            {"metric": f"plain{colour[7:]}", "dimension": metered["region"]},
            f"dimension: '{metered['region']}' is no dimension of 'plain{colour[7:]}', which "
            "has no meter (known: none)",
        ),
        ({f"filter[{metered['region']}]x": "1"}, "unknown query parameter(s): filter["),
        ({"filter": "eu"}, "filter: give it as filter[<name>]=value"),
    ]
    for params, problem in cases:
        response = client.get(path, params=params, headers=bearer(admin.token))
        assert response.status_code == 422, (params, response.text)
        assert problem in response.json()["error"]["message"], response.text
    assert client.get(path, params={"dimension": metered["region"]}).status_code == 401
    missing = client.get(
        f"{API_PREFIX}/organizations/no-such-org/usage",
        params={"dimension": metered["region"]},
        headers=bearer(admin.token),
    )
    assert missing.status_code == 404
    assert "organization 'no-such-org' not found" in missing.json()["error"]["message"]


def test_the_meters_page_and_the_usage_page_by_dimension(
    browser: tuple[TestClient, str], tenant: dict[str, object], metered: dict[str, Any]
) -> None:
    c, _ = browser
    page = c.get("/meters")
    assert page.status_code == 200
    assert f"<code>{metered['metric']}</code></td><td>max</td>" in page.text
    assert f"{metered['region']}, {metered['tier']}" in page.text
    assert 'href="/meters" aria-current="page"' in page.text
    day = metered["day"].date()
    usage = c.get(
        f"/organizations/{tenant['slug']}/usage",
        params={
            "from": day.isoformat(),
            "to": (day + timedelta(days=1)).isoformat(),
            "granularity": "day",
            "dimension": metered["region"],
        },
    )
    assert usage.status_code == 200, usage.text
    assert f"{metered['metric']} · {metered['region']}: us" in usage.text
    assert f'name="filter[{metered["region"]}]"' in usage.text
    refused = c.get(f"/organizations/{tenant['slug']}/usage", params={"dimension": "nope"})
    assert refused.status_code == 422
    assert "&#39;nope&#39; is no dimension of any meter" in refused.text


# --- billing runs, mismatches, replay runs --------------------------------------------------


def test_billing_and_replay_runs_are_listed_newest_first(
    client: TestClient, engine: Engine, admin: OperatorToken
) -> None:
    now = datetime.now(UTC)
    with unit_of_work(engine) as session:
        run = BillingRun(as_of=now, dry_run=False, status="finished", subscriptions=3)
        replay = ReplayRun(
            range_start=now - timedelta(hours=1), range_end=now, dry_run=True, status="dry_run",
            events_read=5, windows_changed=0, changes=[], finished_at=now,
        )  # fmt: skip
        session.add_all([run, replay])
        session.flush()
        run_id, replay_id = run.id, replay.id
        assert list_replay_runs(session, limit=1).total >= 1
    runs = client.get(f"{API_PREFIX}/billing-runs", headers=bearer(admin.token)).json()
    replays = client.get(f"{API_PREFIX}/replay-runs", headers=bearer(admin.token)).json()
    assert runs["items"][0]["id"] == str(run_id)
    assert runs["items"][0]["subscriptions"] == 3
    assert replays["items"][0]["id"] == str(replay_id)


def test_resolving_a_mismatch_keeps_the_note_and_who(
    client: TestClient, engine: Engine, admin: OperatorToken, tenant: dict[str, object]
) -> None:
    path = _path("/mismatches/{mismatch}/resolve", tenant)
    response = client.post(
        path, json={"note": "Stripe price is right"}, headers=bearer(admin.token)
    )
    assert response.status_code == 200
    body = response.json()
    assert (body["resolved"], body["resolved_by"], body["resolution_note"]) == (
        True, admin.name, "Stripe price is right",
    )  # fmt: skip
    again = client.post(path, json={"note": "again"}, headers=bearer(admin.token))
    assert again.status_code == 409
    open_ids = [
        m["id"]
        for m in client.get(f"{API_PREFIX}/mismatches", headers=bearer(admin.token)).json()["items"]
    ]
    assert str(tenant["mismatch_id"]) not in open_ids
    assert len(_audit(engine, "mismatch.resolve", tenant["mismatch_id"])) == 1


@pytest.mark.parametrize(
    "body", [{}, {"note": ""}, {"note": "  "}, {"note": 5}, {"note": "x" * 2001}]
)
def test_a_resolution_without_a_usable_note_is_422(
    client: TestClient, admin: OperatorToken, tenant: dict[str, object], body: dict[str, object]
) -> None:
    response = client.post(
        _path("/mismatches/{mismatch}/resolve", tenant), json=body, headers=bearer(admin.token)
    )
    assert response.status_code == 422
    assert "note" in response.json()["error"]["message"]


def test_an_unknown_mismatch_is_404(client: TestClient, admin: OperatorToken) -> None:
    for reference in (str(uuid.uuid4()), "not-an-id"):
        response = client.post(
            f"{API_PREFIX}/mismatches/{reference}/resolve", json={"note": "x"},
            headers=bearer(admin.token),
        )  # fmt: skip
        assert response.status_code == 404


def test_a_rerun_finding_the_same_difference_keeps_a_persons_resolution(
    client: TestClient, engine: Engine, admin: OperatorToken, tenant: dict[str, object]
) -> None:
    from services.billing.report_repository import Mismatch, record_mismatch

    client.post(
        _path("/mismatches/{mismatch}/resolve", tenant), json={"note": "accepted"},
        headers=bearer(admin.token),
    )  # fmt: skip
    with unit_of_work(engine) as session:
        found = session.get(ReconciliationMismatch, tenant["mismatch_id"])
        again = Mismatch(
            found.subscription_id, found.kind, found.ours, found.theirs, amount=found.amount
        )
        record_mismatch(session.connection(), None, again)
    with unit_of_work(engine) as session:
        assert session.get(ReconciliationMismatch, tenant["mismatch_id"]).resolved is True


# --- subscriptions --------------------------------------------------------------------------


def _subscriber(engine: Engine) -> tuple[str, str, str]:
    """A committed organization without a subscription, and two active plans of one currency:
    (organization slug, plan key, other plan key)."""
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session)
        first = factories.make_plan(session, price_monthly=2900)
        second = factories.make_plan(session, price_monthly=9900)
        return organization.slug, first.key, second.key


def _subscribe(client: TestClient, token: str, **body: object) -> Any:
    return client.post(f"{API_PREFIX}/subscriptions", json=body, headers=bearer(token))


def test_creating_a_subscription_subscribes_from_now_and_audits_who(
    client: TestClient, engine: Engine, admin: OperatorToken
) -> None:
    slug, plan, _ = _subscriber(engine)
    before = datetime.now(UTC).replace(microsecond=0)
    response = _subscribe(client, admin.token, organization=slug, plan=plan, interval="year",
                          trial_days=14)  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["organization"], body["plan"], body["status"], body["billing_interval"]) == (
        slug, plan, "trialing", "year",
    )  # fmt: skip
    anchor = datetime.fromisoformat(body["billing_cycle_anchor"])
    assert before <= anchor <= datetime.now(UTC) and anchor.microsecond == 0
    assert datetime.fromisoformat(body["trial_end"]) == anchor + timedelta(days=14)
    assert [p["plan"] for p in body["phases"]] == [plan]
    [entry] = _audit(engine, "subscription.create", body["id"])
    assert (entry.actor, entry.details["plan"], entry.details["trial_days"]) == (
        admin.name, plan, 14,
    )  # fmt: skip


def test_a_second_live_subscription_of_an_organization_is_409(
    client: TestClient, engine: Engine, admin: OperatorToken, tenant: dict[str, object]
) -> None:
    response = _subscribe(client, admin.token, organization=tenant["slug"],
                          plan=tenant["plan_key"])  # fmt: skip
    assert response.status_code == 409
    assert "already has a live subscription" in response.json()["error"]["message"]
    with unit_of_work(engine) as session:
        assert session.scalars(
            sa.select(Subscription).where(Subscription.organization_id == tenant["organization_id"])
        ).all() == [session.get(Subscription, tenant["subscription_id"])]


@pytest.mark.parametrize(
    ("body", "problems"),
    [
        ({}, ["organization", "plan"]),
        ({"organization": "", "plan": 5}, ["organization", "plan"]),
        ({"organization": "o", "plan": "p", "interval": "week"}, ["interval"]),
        ({"organization": "o", "plan": "p", "trial_days": -1}, ["trial_days"]),
        ({"organization": "o", "plan": "p", "trial_days": "3"}, ["trial_days"]),
        ({"organization": "o", "plan": "p", "trial_days": True}, ["trial_days"]),
        ({"organization": "o", "plan": "p", "trial_days": 731}, ["trial_days"]),
        ({"organization": "o\x00", "plan": "p"}, ["organization"]),
    ],
)
def test_a_subscription_body_with_bad_fields_is_422_naming_each(
    client: TestClient, admin: OperatorToken, body: dict[str, object], problems: list[str]
) -> None:
    response = client.post(f"{API_PREFIX}/subscriptions", json=body, headers=bearer(admin.token))
    assert response.status_code == 422
    details = response.json()["error"]["details"]
    assert [d.split(":")[0] for d in details] == problems


def test_subscribing_an_unknown_organization_or_to_an_unknown_plan_is_404(
    client: TestClient, engine: Engine, admin: OperatorToken
) -> None:
    slug, plan, _ = _subscriber(engine)
    for body in ({"organization": "no-such-org", "plan": plan},
                 {"organization": slug, "plan": "no-such-plan"}):  # fmt: skip
        response = _subscribe(client, admin.token, **body)
        assert response.status_code == 404, body
    assert (
        client.get(
            f"{API_PREFIX}/subscriptions",
            params={"organization": slug},
            headers=bearer(admin.token),
        ).json()["items"]
        == []
    )


def test_subscriptions_are_listed_by_organization_and_status(
    client: TestClient, engine: Engine, admin: OperatorToken, tenant: dict[str, object]
) -> None:
    def listed(**params: str) -> list[str]:
        response = client.get(f"{API_PREFIX}/subscriptions", params=params,
                              headers=bearer(admin.token))  # fmt: skip
        assert response.status_code == 200, response.text
        return [s["id"] for s in response.json()["items"]]

    ours = str(tenant["subscription_id"])
    assert listed(organization=str(tenant["slug"])) == [ours]
    assert listed(organization=str(tenant["organization_id"]), status="active") == [ours]
    assert listed(organization=str(tenant["slug"]), status="canceled") == []
    assert ours in listed(limit="200")


@pytest.mark.parametrize(
    ("params", "status"),
    [({"status": "sleeping"}, 422), ({"limit": "201"}, 422), ({"organization": "no-such"}, 404)],
)
def test_bad_subscription_filters_are_refused(
    client: TestClient, admin: OperatorToken, params: dict[str, str], status: int
) -> None:
    response = client.get(f"{API_PREFIX}/subscriptions", params=params,
                          headers=bearer(admin.token))  # fmt: skip
    assert response.status_code == status


def test_a_subscription_shows_its_phases_and_invoices(
    client: TestClient, admin: OperatorToken, tenant: dict[str, object]
) -> None:
    body = client.get(
        _path("/subscriptions/{subscription}", tenant), headers=bearer(admin.token)
    ).json()
    assert (body["id"], body["organization"], body["plan"]) == (
        str(tenant["subscription_id"]), tenant["slug"], tenant["plan_key"],
    )  # fmt: skip
    assert body["phases"] == []  # one plan throughout, no change yet
    assert [(i["id"], i["total"]) for i in body["invoices"]] == [(str(tenant["invoice_id"]), 6150)]


def test_changing_the_plan_adds_a_phase_from_now_and_audits_it(
    client: TestClient, engine: Engine, admin: OperatorToken
) -> None:
    slug, plan, other = _subscriber(engine)
    created = _subscribe(client, admin.token, organization=slug, plan=plan).json()
    path = f"{API_PREFIX}/subscriptions/{created['id']}/change-plan"
    changed = client.post(path, json={"plan": other}, headers=bearer(admin.token))
    assert changed.status_code == 200, changed.text
    assert changed.json()["plan"] == other
    assert [p["plan"] for p in changed.json()["phases"]][-1] == other
    again = client.post(path, json={"plan": other}, headers=bearer(admin.token))
    assert again.status_code == 200
    with unit_of_work(engine) as session:
        phases = session.scalars(
            sa.select(SubscriptionPhase).where(SubscriptionPhase.subscription_id == created["id"])
        ).all()
    assert len(phases) in (1, 2)  # a change in the anchor's own second replaces its phase
    [entry] = _audit(
        engine, "subscription.change_plan", created["id"]
    )  # the repeat changed nothing
    assert entry.details["plan"] == other


@pytest.mark.parametrize("body", [{}, {"plan": ""}, {"plan": ["x"]}])
def test_a_plan_change_without_a_plan_is_422(
    client: TestClient, admin: OperatorToken, tenant: dict[str, object], body: dict[str, object]
) -> None:
    response = client.post(_path("/subscriptions/{subscription}/change-plan", tenant), json=body,
                           headers=bearer(admin.token))  # fmt: skip
    assert response.status_code == 422
    assert response.json()["error"]["details"] == ["plan: is required, a string"]


def test_canceling_now_ends_billing_now_and_a_second_cancel_is_409(
    client: TestClient, engine: Engine, admin: OperatorToken
) -> None:
    slug, plan, _ = _subscriber(engine)
    created = _subscribe(client, admin.token, organization=slug, plan=plan).json()
    path = f"{API_PREFIX}/subscriptions/{created['id']}/cancel"
    canceled = client.post(path, json={}, headers=bearer(admin.token))
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "canceled"
    assert canceled.json()["canceled_at"] is not None
    again = client.post(path, json={}, headers=bearer(admin.token))
    assert again.status_code == 409
    [entry] = _audit(engine, "subscription.cancel", created["id"])
    assert entry.details["at_period_end"] is False


def test_canceling_at_the_period_end_keeps_it_live_until_then(
    client: TestClient, engine: Engine, admin: OperatorToken
) -> None:
    slug, plan, _ = _subscriber(engine)
    created = _subscribe(client, admin.token, organization=slug, plan=plan).json()
    response = client.post(f"{API_PREFIX}/subscriptions/{created['id']}/cancel",
                           json={"at_period_end": True}, headers=bearer(admin.token))  # fmt: skip
    body = response.json()
    assert (body["status"], body["cancel_at_period_end"], body["canceled_at"]) == (
        "active", True, None,
    )  # fmt: skip
    refused = client.post(f"{API_PREFIX}/subscriptions/{created['id']}/cancel",
                          json={"at_period_end": "yes"}, headers=bearer(admin.token))  # fmt: skip
    assert refused.status_code == 422


@pytest.mark.parametrize("reference", [str(uuid.uuid4()), "not-an-id"])
def test_an_unknown_subscription_is_404_to_every_route(
    client: TestClient, admin: OperatorToken, tenant: dict[str, object], reference: str
) -> None:
    base = f"{API_PREFIX}/subscriptions/{reference}"
    answers = [
        client.get(base, headers=bearer(admin.token)),
        client.post(f"{base}/change-plan", json={"plan": tenant["plan_key"]},
                    headers=bearer(admin.token)),
        client.post(f"{base}/cancel", json={}, headers=bearer(admin.token)),
    ]  # fmt: skip
    assert [a.status_code for a in answers] == [404] * 3


# --- invoices -------------------------------------------------------------------------------


def test_invoices_are_listed_by_organization_subscription_and_status(
    client: TestClient, admin: OperatorToken, tenant: dict[str, object]
) -> None:
    def listed(**params: str) -> list[str]:
        response = client.get(f"{API_PREFIX}/invoices", params=params,
                              headers=bearer(admin.token))  # fmt: skip
        assert response.status_code == 200, response.text
        return [i["id"] for i in response.json()["items"]]

    ours = str(tenant["invoice_id"])
    assert listed(organization=str(tenant["slug"])) == [ours]
    assert listed(subscription=str(tenant["subscription_id"]), status="final") == [ours]
    assert listed(organization=str(tenant["slug"]), status="draft") == []


@pytest.mark.parametrize(
    ("params", "status"),
    [({"status": "paid"}, 422), ({"subscription": "nope"}, 422), ({"limit": "0"}, 422),
     ({"organization": "no-such"}, 404)],
)  # fmt: skip
def test_bad_invoice_filters_are_refused(
    client: TestClient, admin: OperatorToken, params: dict[str, str], status: int
) -> None:
    response = client.get(f"{API_PREFIX}/invoices", params=params, headers=bearer(admin.token))
    assert response.status_code == status


def test_an_invoice_shows_its_lines_and_total(
    client: TestClient, admin: OperatorToken, tenant: dict[str, object]
) -> None:
    body = client.get(_path("/invoices/{invoice}", tenant), headers=bearer(admin.token)).json()
    assert (body["organization"], body["status"], body["flat_amount"], body["total"]) == (
        tenant["slug"], "final", 4900, 6150,
    )  # fmt: skip
    assert body["flat_lines"] == [{"description": "Plan fee", "amount": 4900}]
    assert [
        (line["metric"], line["quantity"], line["billable_quantity"], line["amount"])
        for line in body["lines"]
    ] == [("api_calls", "1250.5", "1250", 1250)]


def test_an_invoice_renders_as_its_customer_reads_it(
    client: TestClient, app_settings: Settings, admin: OperatorToken, tenant: dict[str, object]
) -> None:
    body = client.get(_path("/invoices/{invoice}/html", tenant), headers=bearer(admin.token)).json()
    page = body["html"]
    assert body["id"] == str(tenant["invoice_id"])
    assert '<td class="num" id="total">61.50 USD</td>' in page
    assert '<td class="num" id="flat">49.00 USD</td>' in page
    assert f"<div>{tenant['name']}</div>" in page
    assert f"<div>{app_settings.seller_name}</div>" in page
    assert "1,250.5 (1,250 billable)" in page


@pytest.mark.parametrize("reference", [str(uuid.uuid4()), "not-an-id"])
def test_an_unknown_invoice_is_404(
    client: TestClient, admin: OperatorToken, reference: str
) -> None:
    for suffix in ("", "/html"):
        response = client.get(f"{API_PREFIX}/invoices/{reference}{suffix}",
                              headers=bearer(admin.token))  # fmt: skip
        assert response.status_code == 404, suffix
        assert response.json()["error"]["code"] == "not_found"


# --- dead letters ---------------------------------------------------------------------------


def test_dead_letters_are_listed_with_their_reason_and_republished(
    client: TestClient, engine: Engine, app_settings: Settings, admin: OperatorToken
) -> None:
    from tests.kafka_support import read_topic

    organization_id = uuid.uuid4()
    payload = envelope_bytes(organization_id, [event("dl-1", timestamp=datetime.now(UTC))])
    bootstrap = app_settings.kafka_bootstrap_servers
    partition, offset = produce_dead_letter(
        bootstrap, app_settings.dlq_topic, payload, organization_id=organization_id
    )
    skip = produce_dead_letter(
        bootstrap, app_settings.dlq_topic, b"garbage", organization_id=organization_id,
        code="malformed", retryable=False, reason="not JSON",
    )  # fmt: skip
    listed = client.get(f"{API_PREFIX}/dead-letters", headers=bearer(admin.token)).json()
    by_reference = {d["reference"]: d for d in listed["items"]}
    letter = by_reference[f"{partition}:{offset}"]
    assert (letter["code"], letter["retryable"], letter["event_ids"]) == (
        "unknown_reference", True, ["dl-1"],
    )  # fmt: skip
    assert letter["organization_id"] == str(organization_id)
    assert by_reference[f"{skip[0]}:{skip[1]}"]["reason"] == "not JSON"
    assert listed["retained"] >= 2

    sent = client.post(
        f"{API_PREFIX}/dead-letters/{partition}:{offset}/republish", headers=bearer(admin.token)
    )
    assert sent.status_code == 200
    on_topic = [
        r.value
        for r in read_topic(bootstrap, app_settings.events_topic)
        if r.key == str(organization_id).encode()
    ]
    assert on_topic == [payload]
    # References repeat across the suite's topics (each module has its own): count this letter's.
    audited = _audit(engine, "dead_letter.republish", f"{partition}:{offset}")
    assert [a.details["organization_id"] for a in audited].count(str(organization_id)) == 1

    refused = client.post(
        f"{API_PREFIX}/dead-letters/{skip[0]}:{skip[1]}/republish", headers=bearer(admin.token)
    )
    assert refused.status_code == 409
    assert "malformed" in refused.json()["error"]["message"]


def test_a_republished_letter_leaves_out_events_postgresql_cannot_store(
    client: TestClient, app_settings: Settings, admin: OperatorToken
) -> None:
    """As `replay dlq` does: the storable events of a letter go back, a NUL one does not, and a
    letter of nothing but such events is refused (409) with nothing sent."""
    from tests.kafka_support import read_topic

    organization_id = uuid.uuid4()
    now = datetime.now(UTC)
    bootstrap = app_settings.kafka_bootstrap_servers
    events = [event("ok-1", timestamp=now), event("nul\x00", timestamp=now)]
    mixed = produce_dead_letter(
        bootstrap, app_settings.dlq_topic, envelope_bytes(organization_id, events),
        organization_id=organization_id, code="database_rejected", reason="NUL",
    )  # fmt: skip
    only_bad = produce_dead_letter(
        bootstrap, app_settings.dlq_topic,
        envelope_bytes(organization_id, [event("nul-2\x00", timestamp=now)]),
        organization_id=organization_id, code="database_rejected", reason="NUL",
    )  # fmt: skip
    for reference, status in [(mixed, 200), (only_bad, 409)]:
        response = client.post(
            f"{API_PREFIX}/dead-letters/{reference[0]}:{reference[1]}/republish",
            headers=bearer(admin.token),
        )
        assert response.status_code == status, response.text
    sent = [
        decode_envelope(r.value)
        for r in read_topic(bootstrap, app_settings.events_topic)
        if r.key == str(organization_id).encode()
    ]
    assert [[e.id for e in envelope.events] for envelope in sent] == [["ok-1"]]


@pytest.mark.parametrize(("reference", "status"), [("0:999999", 404), ("99:0", 404), ("x", 422)])
def test_a_dead_letter_that_is_not_there_is_refused(
    client: TestClient, admin: OperatorToken, reference: str, status: int
) -> None:
    response = client.post(
        f"{API_PREFIX}/dead-letters/{reference}/republish", headers=bearer(admin.token)
    )
    assert response.status_code == status


def test_republishing_all_retryable_letters_reports_what_it_did(
    client: TestClient, admin: OperatorToken
) -> None:
    first = client.post(
        f"{API_PREFIX}/dead-letters/republish-retryable", headers=bearer(admin.token)
    ).json()
    second = client.post(
        f"{API_PREFIX}/dead-letters/republish-retryable", headers=bearer(admin.token)
    ).json()
    assert set(first) == {"read", "republished", "skipped"}
    assert second == {"read": 0, "republished": 0, "skipped": {}}


# --- pipeline and audit ---------------------------------------------------------------------


def test_pipeline_health_names_unreachable_services_and_every_partition(
    client: TestClient, admin: OperatorToken, app_settings: Settings
) -> None:
    body = client.get(f"{API_PREFIX}/pipeline", headers=bearer(admin.token)).json()
    assert [s["status"] for s in body["ingest"] + body["aggregators"]] == ["unreachable"] * 2
    assert [p["partition"] for p in body["partitions"]] == list(
        range(app_settings.topic_partitions)
    )
    assert body["consumer_group"] == f"{app_settings.topic_prefix}-aggregator"


def test_pipeline_samples_become_a_throughput_series(
    client: TestClient, engine: Engine, admin: OperatorToken
) -> None:
    from shared.models import PipelineSample

    now = datetime.now(UTC)
    with unit_of_work(engine) as session:
        session.execute(sa.delete(PipelineSample))
        for seconds, total in ((-30, 1000), (-20, 1500), (-10, 100)):  # a restart reset the count
            session.add(
                PipelineSample(sampled_at=now + timedelta(seconds=seconds), events_total=total,
                               lag=7, partitions=[{"partition": 0, "committed": 3, "end": 10}],
                               dlq_messages=2, dlq_pending=1)
            )  # fmt: skip
    try:
        body = client.get(f"{API_PREFIX}/pipeline", headers=bearer(admin.token)).json()
    finally:
        with unit_of_work(engine) as session:
            session.execute(sa.delete(PipelineSample))
    assert [s["events_per_second"] for s in body["samples"]] == [None, 50.0, 10.0]
    # The offsets come from the latest sample, fresh enough: no Kafka read on the request.
    assert body["partitions"] == [{"partition": 0, "committed": 3, "end": 10, "lag": 7}]
    assert body["dead_letters"] == {"retained": 2, "pending": 1, "error": None}


def test_audit_lists_changes_newest_first_and_filters_by_action(
    client: TestClient, admin: OperatorToken, tenant: dict[str, object]
) -> None:
    client.post(_path("/api-keys/{key}/revoke", tenant), headers=bearer(admin.token))
    found = client.get(
        f"{API_PREFIX}/audit", params={"action": "api_key.revoke"}, headers=bearer(admin.token)
    ).json()
    assert found["items"][0]["target_id"] == str(tenant["key_id"])
    assert {e["action"] for e in found["items"]} == {"api_key.revoke"}


# --- sessions and CSRF ----------------------------------------------------------------------


@pytest.fixture
def browser(app_settings: Settings, admin: OperatorToken) -> Iterator[tuple[TestClient, str]]:
    app = create_app(app_settings, sample=False, configure_logs=False)
    with TestClient(app, base_url=URL, follow_redirects=False) as c:
        yield c, login(c, admin.token)


def test_session_cookie_is_secure_httponly_and_samesite_strict(
    app_settings: Settings, admin: OperatorToken
) -> None:
    app = create_app(app_settings, sample=False, configure_logs=False)
    with TestClient(app, base_url=URL, follow_redirects=False) as c:
        form = c.get("/login")
        token = form.text.split('name="login_csrf" value="')[1].split('"')[0]
        response = c.post("/login", data={"token": admin.token, "login_csrf": token})
    cookie = next(
        v for k, v in response.headers.multi_items() if k == "set-cookie" and "session" in v
    )
    assert cookie.startswith("__Host-meterline_session=")
    for attribute in ("Secure", "HttpOnly", "SameSite=strict", "Path=/"):
        assert attribute.lower() in cookie.lower()


def test_a_session_change_without_the_csrf_token_is_refused(
    browser: tuple[TestClient, str], engine: Engine, tenant: dict[str, object]
) -> None:
    c, _ = browser
    api = c.post(_path("/api-keys/{key}/revoke", tenant))
    page = c.post(f"/api-keys/{tenant['key_id']}/revoke", data={})
    wrong = c.post(f"/api-keys/{tenant['key_id']}/revoke", data={"csrf_token": "x" * 64})
    assert (api.status_code, page.status_code, wrong.status_code) == (403, 403, 403)
    assert api.json()["error"]["code"] == "csrf_refused"
    with unit_of_work(engine) as session:
        assert session.get(ApiKey, tenant["key_id"]).revoked_at is None


def test_a_session_change_from_another_origin_is_refused_even_with_the_token(
    browser: tuple[TestClient, str], engine: Engine, tenant: dict[str, object]
) -> None:
    c, csrf = browser
    for headers in ({"origin": "https://evil.example"}, {"sec-fetch-site": "cross-site"}):
        response = c.post(
            f"/api-keys/{tenant['key_id']}/revoke", data={"csrf_token": csrf}, headers=headers
        )
        assert response.status_code == 403
    with unit_of_work(engine) as session:
        assert session.get(ApiKey, tenant["key_id"]).revoked_at is None


def test_a_session_change_with_its_csrf_token_is_made(
    browser: tuple[TestClient, str], engine: Engine, tenant: dict[str, object]
) -> None:
    c, csrf = browser
    page = c.post(f"/api-keys/{tenant['key_id']}/revoke", data={"csrf_token": csrf},
                  headers={"origin": URL})  # fmt: skip
    assert page.status_code == 303
    api = c.post(_path("/mismatches/{mismatch}/resolve", tenant), json={"note": "ok"},
                 headers={"x-csrf-token": csrf})  # fmt: skip
    assert api.status_code == 200
    with unit_of_work(engine) as session:
        assert session.get(ApiKey, tenant["key_id"]).revoked_at is not None


def test_a_login_post_without_the_login_form_token_is_refused(
    app_settings: Settings, admin: OperatorToken
) -> None:
    app = create_app(app_settings, sample=False, configure_logs=False)
    with TestClient(app, base_url=URL, follow_redirects=False) as c:
        response = c.post("/login", data={"token": admin.token})
        assert response.status_code == 403
        assert c.get(f"{API_PREFIX}/me").status_code == 401


def test_logging_out_ends_the_session(browser: tuple[TestClient, str]) -> None:
    c, csrf = browser
    assert c.get(f"{API_PREFIX}/me").status_code == 200
    assert c.post("/logout", data={"csrf_token": csrf}).status_code == 303
    assert c.get(f"{API_PREFIX}/me").status_code == 401


def test_revoking_an_operator_ends_its_sessions(app_settings: Settings, engine: Engine) -> None:
    operator = make_operator(engine, OperatorRole.ADMIN)
    app = create_app(app_settings, sample=False, configure_logs=False)
    with TestClient(app, base_url=URL, follow_redirects=False) as c:
        login(c, operator.token)
        assert c.get(f"{API_PREFIX}/me").status_code == 200
        with unit_of_work(engine) as session:
            revoke_operator(session, operator.id, now=datetime.now(UTC))
        assert c.get(f"{API_PREFIX}/me").status_code == 401
        assert c.get("/organizations").headers["location"].startswith("/login")


def test_login_never_redirects_off_the_site(app_settings: Settings, admin: OperatorToken) -> None:
    app = create_app(app_settings, sample=False, configure_logs=False)
    with TestClient(app, base_url=URL, follow_redirects=False) as c:
        form = c.get("/login")
        token = form.text.split('name="login_csrf" value="')[1].split('"')[0]
        response = c.post(
            "/login", data={"token": admin.token, "login_csrf": token, "next": "//evil.example/x"}
        )
        assert response.headers["location"] == "/"


def test_pages_carry_a_content_security_policy(browser: tuple[TestClient, str]) -> None:
    c, _ = browser
    response = c.get("/organizations")
    assert response.status_code == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"


def test_session_changes_to_subscriptions_need_the_csrf_token(
    browser: tuple[TestClient, str], engine: Engine, tenant: dict[str, object]
) -> None:
    c, csrf = browser
    subscription = tenant["subscription_id"]
    refused = [
        c.post(f"/subscriptions/{subscription}/cancel", data={"when": "now"}),
        c.post(f"/subscriptions/{subscription}/change-plan", data={"plan": "x", "csrf_token": "y"}),
        c.post("/subscriptions", data={"organization": str(tenant["slug"]), "plan": "x"}),
        c.post(_path("/subscriptions/{subscription}/cancel", tenant), json={}),
    ]
    assert [r.status_code for r in refused] == [403] * 4
    assert refused[-1].json()["error"]["code"] == "csrf_refused"
    with unit_of_work(engine) as session:
        assert session.get(Subscription, subscription).status == "active"
    made = c.post(f"/subscriptions/{subscription}/cancel", data={"when": "now", "csrf_token": csrf},
                  headers={"origin": URL})  # fmt: skip
    assert made.status_code == 303
    assert made.headers["location"] == f"/subscriptions/{subscription}"
    with unit_of_work(engine) as session:
        assert session.get(Subscription, subscription).status == "canceled"
    assert len(_audit(engine, "subscription.cancel", subscription)) == 1


def test_a_session_subscribes_through_the_form(
    browser: tuple[TestClient, str], engine: Engine
) -> None:
    c, csrf = browser
    slug, plan, _ = _subscriber(engine)
    made = c.post("/subscriptions", data={"organization": slug, "plan": plan, "interval": "month",
                                          "trial_days": "", "csrf_token": csrf})  # fmt: skip
    assert made.status_code == 303, made.text
    page = c.get(made.headers["location"])
    assert "Subscribed: the subscription starts now." in page.text
    assert f'<code id="plan">{plan}</code>' in page.text
    refused = c.post("/subscriptions", data={"organization": slug, "plan": plan,
                                             "trial_days": "many", "csrf_token": csrf})  # fmt: skip
    assert refused.status_code == 422
    assert "trial_days" in refused.text


def test_the_customer_page_is_the_invoice_rendering_with_only_its_own_style(
    browser: tuple[TestClient, str], admin: OperatorToken, tenant: dict[str, object]
) -> None:
    c, _ = browser
    page = c.get(f"/invoices/{tenant['invoice_id']}/document")
    api = c.get(_path("/invoices/{invoice}/html", tenant)).json()["html"]
    assert page.status_code == 200
    assert page.text.strip() == api.strip()
    policy = page.headers["content-security-policy"]
    assert policy.startswith("default-src 'none'; style-src 'sha256-")
    assert "script-src" not in policy and "unsafe-inline" not in policy
    detail = c.get(f"/invoices/{tenant['invoice_id']}")
    assert f'href="/invoices/{tenant["invoice_id"]}/document"' in detail.text
    assert "61.50 USD" in detail.text


def test_a_viewer_sees_subscriptions_and_invoices_without_a_change_form(
    app_settings: Settings, viewer: OperatorToken, tenant: dict[str, object]
) -> None:
    app = create_app(app_settings, sample=False, configure_logs=False)
    with TestClient(app, base_url=URL, follow_redirects=False) as c:
        login(c, viewer.token)
        for path in (
            f"/subscriptions?organization={tenant['slug']}",
            f"/subscriptions/{tenant['subscription_id']}",
            f"/invoices?organization={tenant['slug']}",
            f"/invoices/{tenant['invoice_id']}",
        ):
            page = c.get(path)
            assert page.status_code == 200, path
            main = page.text.split("<main>", 1)[1]
            assert 'method="post"' not in main, path  # no change form (filters are GET)
        listed = c.get(f"/subscriptions?organization={tenant['slug']}").text
        assert f'data-subscription="{tenant["subscription_id"]}"' in listed
