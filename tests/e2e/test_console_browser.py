"""The console in a real browser (Debian's Chromium, driven by Playwright) against the real
services: an admin logs in, finds an organization, revokes a key and sees ingest refuse it, applies
a plan, subscribes an organization, sees `meterline billing run` invoice its usage and reads the
invoice as its customer would, cancels the subscription, re-publishes a dead letter and sees the
aggregator count it, marks a mismatch resolved; a viewer finds no button for any of that and the
API answers 403. Saves the screenshots the README shows (docs/screenshots/)."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine

from shared.db import unit_of_work
from shared.models import (
    ApiKey,
    OperatorRole,
    Organization,
    ReconciliationMismatch,
    Subscription,
)
from shared.settings import Settings
from shared.topics import ensure_topics
from shared.usage import UsageDelta, record_usage
from tests import factories
from tests.aggregator_support import (
    AggregatorProcess,
    Producer,
    envelope_bytes,
    event,
    totals,
    wait_for,
)
from tests.console_support import OperatorToken, bearer, make_operator, run_console
from tests.ingest_support import make_tenant, run_ingest

ROOT = Path(__file__).resolve().parents[2]
METERLINE = str(Path(sys.executable).parent / "meterline")
SHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = shutil.which("chromium")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make install)")


@dataclass
class Stack:
    console: str
    ingest: str
    settings: Settings
    admin: OperatorToken
    viewer: OperatorToken
    env: dict[str, str]


@pytest.fixture(scope="module")
def stack(
    service_env: dict[str, str], engine: Engine, settings: Settings, tmp_path_factory: Any
) -> Iterator[Stack]:
    prefix = f"ui{secrets.token_hex(3)}"
    env = {**service_env, "METERLINE_TOPIC_PREFIX": prefix}
    ours = settings.model_copy(update={"topic_prefix": prefix})
    ensure_topics(ours)
    logs = tmp_path_factory.mktemp("console-browser")
    aggregator = AggregatorProcess(env, logs / "aggregator.log").start()
    try:
        with run_ingest(env, logs / "ingest.log") as ingest:
            console_env = {
                **env,
                "METERLINE_CONSOLE_INGEST_URLS": ingest.url,
                "METERLINE_CONSOLE_AGGREGATOR_URLS": f"http://127.0.0.1:{aggregator.port}",
                "METERLINE_CONSOLE_SAMPLE_SECONDS": "1",
            }
            with run_console(console_env, logs / "console.log") as console:
                yield Stack(
                    console.url,
                    ingest.url,
                    ours,
                    make_operator(engine, OperatorRole.ADMIN),
                    make_operator(engine, OperatorRole.VIEWER),
                    env,
                )
    finally:
        aggregator.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def _page(browser: Any, stack: Stack, operator: OperatorToken, width: int = 1280) -> Any:
    context = browser.new_context(viewport={"width": width, "height": 900}, base_url=stack.console)
    page = context.new_page()
    page.goto("/")
    assert page.url.endswith("/login?next=/")
    page.fill("#token", operator.token)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{stack.console}/")
    return page


def _shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _post(stack: Stack, key: str) -> int:
    body = {"id": f"ui-{uuid.uuid4()}", "metric": "api_calls"}
    return httpx.post(
        f"{stack.ingest}/v1/events", json=body, headers=bearer(key), timeout=10
    ).status_code


def test_an_admin_revokes_a_key_and_ingest_refuses_it(
    browser: Any, stack: Stack, engine: Engine
) -> None:
    tenant = make_tenant(engine)
    with unit_of_work(engine) as session:
        organization = session.get(Organization, tenant.organization_id)
        slug = organization.slug
        prefix = session.get(ApiKey, tenant.key_id).prefix
        start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        record_usage(
            session,
            [
                UsageDelta(tenant.organization_id, tenant.project_id if h % 2 else None, None,
                           metric, start - timedelta(hours=h), 3600,
                           Decimal(100 + (h * 37) % 90) * (3 if metric == "exports" else 1), 40)
                for h in range(72) for metric in ("api_calls", "exports")
            ],
        )  # fmt: skip
    assert _post(stack, tenant.key) == 202

    page = _page(browser, stack, stack.admin)
    _shot(page, "overview")
    page.click("nav >> text=Organizations")
    page.fill("#q", slug)
    page.get_by_role("button", name="Search").click()
    _shot(page, "organizations")
    page.click(f"a:text-is('{slug}')")
    row = page.locator(f"tr[data-prefix='{prefix}']")
    assert row.locator(".state").inner_text() == "active"
    row.get_by_role("button", name=f"Revoke key {prefix}").click()
    assert f"Revoked key {prefix}." in page.locator(".notice").inner_text()
    assert row.locator(".state").inner_text() == "revoked"
    _shot(page, "organization")

    # The key cache bound is METERLINE_KEY_CACHE_TTL_SECONDS (2 s here): allow a few of them.
    wait_for(lambda: _post(stack, tenant.key) == 401, timeout=15, what="ingest to refuse the key")

    page.get_by_role("link", name="Usage over time").click()
    page.select_option("#group_by", "project")
    page.get_by_role("button", name="Show").click()
    assert page.locator("svg.chart polyline").count() >= 2
    _shot(page, "organization-usage")
    page.click("nav >> text=Usage")
    _shot(page, "usage")

    phone = _page(browser, stack, stack.admin, width=390)
    phone.goto(f"/organizations/{tenant.organization_id}")
    _shot(phone, "organization-phone")
    phone.context.close()
    page.context.close()


def test_an_admin_applies_a_plan_and_sees_errors_that_name_the_field(
    browser: Any, stack: Stack
) -> None:
    key = f"ui-{secrets.token_hex(3)}"
    page = _page(browser, stack, stack.admin)
    page.goto("/plans")
    page.fill("#document", f"plans:\n  - key: {key}\n    price_monthly: 12.5\n")
    page.get_by_role("button", name="Apply plans").click()
    assert "plans[0].price_monthly: must be an integer" in page.locator(".problems").inner_text()
    page.fill("#document", f"plans:\n  - key: {key}\n    name: Team\n    price_monthly: 1900\n")
    page.get_by_role("button", name="Apply plans").click()
    assert f"Applied plans: {key} created." in page.locator(".notice").inner_text()
    assert page.locator(f"td code:text-is('{key}')").count() == 1
    _shot(page, "plans")
    page.context.close()


def test_an_admin_subscribes_an_organization_reads_its_invoice_and_cancels(
    browser: Any, stack: Stack, engine: Engine
) -> None:
    tenant = make_tenant(engine)
    plan_key = f"ui-{secrets.token_hex(3)}"
    with unit_of_work(engine) as session:
        slug = session.get(Organization, tenant.organization_id).slug
        factories.make_plan(
            session, key=plan_key, price_monthly=2900,
            features={"metered": {"api_calls": {"model": "per_unit", "unit_amount": "5"}}},
        )  # fmt: skip

    page = _page(browser, stack, stack.admin)
    page.click("nav >> text=Subscriptions")
    page.fill("#new-organization", slug)
    page.select_option("#new-plan", plan_key)
    page.get_by_role("button", name="Subscribe").click()
    assert "Subscribed: the subscription starts now." in page.locator(".notice").inner_text()
    assert page.locator("#status").inner_text() == "active"
    assert page.locator("#plan").inner_text() == plan_key
    subscription_url = page.url

    # Seven events after the subscription's start, counted by the aggregator, billed by the
    # real billing run: 7 x 5 cents of usage and the month's flat fee on a draft invoice.
    for _ in range(7):
        assert _post(stack, tenant.key) == 202
    wait_for(lambda: totals(engine, tenant.organization_id) == (Decimal(7), 7), timeout=60,
             what="the aggregator to count the events")  # fmt: skip
    billed = subprocess.run(
        [METERLINE, "billing", "run", "--organization", str(tenant.organization_id),
         "--no-stripe", "--json"],
        env=stack.env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert billed.returncode == 0, billed.stderr
    [invoice] = json.loads(billed.stdout)["invoices"]
    assert [(line["metric"], line["quantity"], line["amount"]) for line in invoice["lines"]] == [
        ("api_calls", "7", 35)
    ]
    page.goto("/subscriptions?organization=" + slug)
    _shot(page, "subscriptions")
    page.goto(subscription_url)
    page.click(f"tr[data-invoice='{invoice['id']}'] a:text-is('View')")
    assert page.locator("tr[data-metric='api_calls'] .quantity").inner_text() == "7"
    total = f"{invoice['total'] // 100}.{invoice['total'] % 100:02d} USD"
    assert page.locator("#total").inner_text() == total
    _shot(page, "invoice")
    page.get_by_role("link", name="As the customer reads it").click()
    assert page.locator("#total").inner_text() == total
    assert page.locator("#customer").inner_text().startswith("Bill to")
    assert page.locator("table").evaluate("t => getComputedStyle(t).borderCollapse") == "collapse"
    _shot(page, "invoice-customer")

    page.goto(subscription_url)
    page.get_by_role("button", name="Cancel now").click()
    assert "Canceled now." in page.locator(".notice").inner_text()
    assert page.locator("#status").inner_text() == "canceled"
    assert page.get_by_role("button", name="Cancel now").count() == 0
    _shot(page, "subscription")
    page.goto("/audit")
    for action in ("subscription.create", "subscription.cancel"):
        assert page.locator(f"code:text-is('{action}')").count() >= 1, action
    page.context.close()


def test_an_admin_republishes_a_dead_letter_and_the_aggregator_counts_it(
    browser: Any, stack: Stack, engine: Engine
) -> None:
    organization_id = uuid.uuid4()  # not there yet: the aggregator dead-letters its events
    now = datetime.now(UTC)
    events = [event(f"late-{uuid.uuid4()}", quantity=4, timestamp=now)]
    producer = Producer(stack.settings.kafka_bootstrap_servers)
    producer.send(
        stack.settings.events_topic, organization_id, envelope_bytes(organization_id, events)
    )
    producer.flush()
    producer.close()

    page = _page(browser, stack, stack.admin)

    def listed() -> bool:
        page.goto("/dead-letters")
        return page.locator(f"tr:has-text('{str(organization_id)[:12]}')").count() == 1

    wait_for(listed, timeout=60, interval=1, what="the dead letter")
    row = page.locator(f"tr:has-text('{str(organization_id)[:12]}')")
    assert "unknown_reference" in row.inner_text()
    _shot(page, "dead-letters")
    # The fix: the organization exists now, so its events count when they come back.
    with unit_of_work(engine) as session:
        owner = factories.make_user(session)
        session.add(
            Organization(id=organization_id, name="Late", slug=f"late-{secrets.token_hex(3)}")
        )
        session.flush()
        del owner
    assert totals(engine, organization_id) == (Decimal(0), 0)
    row.get_by_role("button").click()
    assert "Re-published" in page.locator(".notice").inner_text()
    wait_for(
        lambda: totals(engine, organization_id) == (Decimal(4), 1),
        timeout=60,
        what="the aggregator to count the re-published events",
    )
    page.goto("/audit")
    assert page.locator("code:text-is('dead_letter.republish')").count() >= 1
    _shot(page, "audit")
    page.context.close()


def test_an_admin_marks_a_mismatch_resolved(browser: Any, stack: Stack, engine: Engine) -> None:
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session)
        plan = factories.make_plan(session)
        subscription = factories.make_subscription(session, organization, plan)
        mismatch = ReconciliationMismatch(
            subscription_id=subscription.id, kind="price_differs", ours="4900", theirs="5900",
            amount=Decimal(1000), resolved=False,
        )  # fmt: skip
        session.add(mismatch)
        session.flush()
        mismatch_id = mismatch.id
    page = _page(browser, stack, stack.admin)
    page.goto("/mismatches")
    row = page.locator(f"tr[data-mismatch='{mismatch_id}']")
    _shot(page, "mismatches")
    row.locator("input[name=note]").fill("Customer keeps the launch price; Stripe is right")
    row.get_by_role("button", name="Mark resolved").click()
    assert "Resolved price_differs" in page.locator(".notice").inner_text()
    assert page.locator(f"tr[data-mismatch='{mismatch_id}']").count() == 0
    with unit_of_work(engine) as session:
        stored = session.get(ReconciliationMismatch, mismatch_id)
        assert (stored.resolved, stored.resolved_by) == (True, stack.admin.name)
    page.goto("/pipeline")
    assert page.locator("td:text-is('ingest') ~ td .state").inner_text() == "ok"
    _shot(page, "pipeline")
    page.goto("/billing-runs")
    _shot(page, "billing-runs")
    page.context.close()


def test_a_viewer_has_no_change_buttons_and_the_api_refuses_it(
    browser: Any, stack: Stack, engine: Engine
) -> None:
    tenant = make_tenant(engine)
    page = _page(browser, stack, stack.viewer)
    for path in (
        f"/organizations/{tenant.organization_id}",
        "/plans",
        "/dead-letters",
        "/mismatches?state=all",
    ):
        page.goto(path)
        assert page.locator("main button, main textarea").count() == 0, path
    with unit_of_work(engine) as session:
        organization = session.get(Organization, tenant.organization_id)
        subscription = factories.make_subscription(
            session, organization, factories.make_plan(session)
        )
        subscription_id = subscription.id
    for path in ("/subscriptions", f"/subscriptions/{subscription_id}", "/invoices"):
        page.goto(path)  # filters are GET forms; there is no form that changes anything
        assert page.locator("main form[method=post], main textarea").count() == 0, path
    api = f"{stack.console}/admin/v1"
    headers = bearer(stack.viewer.token)
    refused = [
        httpx.post(f"{api}/api-keys/{tenant.key_id}/revoke", headers=headers),
        httpx.post(f"{api}/plans/apply", json={"plans": [{"key": "viewer-plan"}]}, headers=headers),
        httpx.post(f"{api}/dead-letters/0:0/republish", headers=headers),
        httpx.post(f"{api}/dead-letters/republish-retryable", headers=headers),
        httpx.post(f"{api}/mismatches/{uuid.uuid4()}/resolve", json={"note": "x"}, headers=headers),
        httpx.post(f"{api}/subscriptions", json={"organization": str(tenant.organization_id),
                                                 "plan": "x"}, headers=headers),
        httpx.post(f"{api}/subscriptions/{subscription_id}/change-plan", json={"plan": "x"},
                   headers=headers),
        httpx.post(f"{api}/subscriptions/{subscription_id}/cancel", json={}, headers=headers),
    ]  # fmt: skip
    assert [r.status_code for r in refused] == [403] * 8
    with unit_of_work(engine) as session:
        assert session.get(Subscription, subscription_id).status == "active"
    assert _post(stack, tenant.key) == 202  # the key is untouched
    page.context.close()
