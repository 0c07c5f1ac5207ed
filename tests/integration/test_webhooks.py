"""POST /v1/stripe/webhook: signed events update subscriptions once; unsigned, stale and
replayed deliveries change nothing."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from services.billing.app import build_app
from shared.db import unit_of_work
from shared.models import (
    ReconciliationMismatch,
    StripeWebhookEvent,
    Subscription,
    SubscriptionStatus,
)
from shared.settings import Settings
from tests import factories


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    assert settings.stripe_webhook_secret.get_secret_value(), "make up writes the webhook secret"
    with TestClient(build_app(settings, schedule=False)) as test_client:
        yield test_client


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    moment = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{moment}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={moment},v1={digest}"


def seeded_subscription(engine: Engine) -> tuple[Any, str]:
    stripe_id = f"sub_{secrets.token_hex(6)}"
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session)
        plan = factories.make_plan(session)
        subscription = factories.make_subscription(
            session, organization, plan, stripe_subscription_id=stripe_id
        )
        return subscription.id, stripe_id


def subscription_event(
    stripe_id: str,
    status: str,
    event_id: str | None = None,
    *,
    created: int | None = None,
    period: tuple[datetime, datetime] = (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    ),
) -> bytes:
    start, end = (int(moment.timestamp()) for moment in period)
    return json.dumps(
        {
            "id": event_id or f"evt_{secrets.token_hex(8)}",
            "object": "event",
            "type": "customer.subscription.updated",
            **({"created": created} if created is not None else {}),
            "data": {
                "object": {
                    "id": stripe_id,
                    "object": "subscription",
                    "customer": "cus_webhook",
                    "status": status,
                    "cancel_at_period_end": True,
                    "items": {
                        "object": "list",
                        "data": [
                            {
                                "id": "si_1",
                                "object": "subscription_item",
                                "current_period_start": start,
                                "current_period_end": end,
                                "price": {"id": "price_1", "object": "price", "unit_amount": 100},
                            }
                        ],
                    },
                }
            },
        }
    ).encode()


def state(engine: Engine, subscription_id: Any) -> tuple[Any, ...]:
    with engine.connect() as connection:
        return tuple(
            connection.execute(
                sa.select(
                    Subscription.status,
                    Subscription.current_period_start,
                    Subscription.cancel_at_period_end,
                    Subscription.updated_at,
                ).where(Subscription.id == subscription_id)
            ).one()
        )


def post(client: TestClient, payload: bytes, signature: str) -> Any:
    return client.post(
        "/v1/stripe/webhook",
        content=payload,
        headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
    )


def test_a_signed_subscription_event_updates_our_subscription(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    subscription_id, stripe_id = seeded_subscription(engine)
    payload = subscription_event(stripe_id, "past_due")

    response = post(
        client, payload, sign(payload, settings.stripe_webhook_secret.get_secret_value())
    )

    assert response.status_code == 200
    assert response.json()["outcome"] == "subscription_updated"
    status, period_start, cancel_at_period_end, _ = state(engine, subscription_id)
    assert (status, period_start, cancel_at_period_end) == (
        "past_due",
        datetime(2026, 12, 1, tzinfo=UTC),
        True,
    )


def test_a_bad_signature_is_refused_and_changes_nothing(client: TestClient, engine: Engine) -> None:
    subscription_id, stripe_id = seeded_subscription(engine)
    before = state(engine, subscription_id)
    payload = subscription_event(stripe_id, "canceled")

    response = post(client, payload, sign(payload, "whsec_not_the_secret"))

    assert response.status_code == 400
    assert state(engine, subscription_id) == before


def test_a_stale_signature_is_refused_and_changes_nothing(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    subscription_id, stripe_id = seeded_subscription(engine)
    before = state(engine, subscription_id)
    payload = subscription_event(stripe_id, "canceled")
    stale = int(time.time()) - 600

    response = post(
        client, payload, sign(payload, settings.stripe_webhook_secret.get_secret_value(), stale)
    )

    assert response.status_code == 400
    assert state(engine, subscription_id) == before


def test_a_replayed_event_id_changes_nothing(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    secret = settings.stripe_webhook_secret.get_secret_value()
    subscription_id, stripe_id = seeded_subscription(engine)
    event_id = f"evt_{secrets.token_hex(8)}"
    first = subscription_event(stripe_id, "past_due", event_id)
    assert post(client, first, sign(first, secret)).status_code == 200
    after_first = state(engine, subscription_id)
    replay = subscription_event(stripe_id, "canceled", event_id)

    response = post(client, replay, sign(replay, secret))

    assert response.status_code == 200
    assert response.json()["outcome"] == "duplicate"
    assert state(engine, subscription_id) == after_first


def test_a_failed_invoice_payment_makes_the_subscription_past_due(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    subscription_id, stripe_id = seeded_subscription(engine)
    payload = json.dumps(
        {
            "id": f"evt_{secrets.token_hex(8)}",
            "object": "event",
            "type": "invoice.payment_failed",
            "data": {
                "object": {
                    "id": "in_1",
                    "object": "invoice",
                    "parent": {"subscription_details": {"subscription": stripe_id}},
                }
            },
        }
    ).encode()

    response = post(
        client, payload, sign(payload, settings.stripe_webhook_secret.get_secret_value())
    )

    assert response.json()["outcome"] == "status_past_due"
    assert state(engine, subscription_id)[0] == "past_due"


def invoice_event(kind: str, metadata: dict[str, str]) -> bytes:
    return json.dumps(
        {
            "id": f"evt_{secrets.token_hex(8)}",
            "object": "event",
            "type": kind,
            "data": {"object": {"id": "in_2", "object": "invoice", "metadata": metadata}},
        }
    ).encode()


def test_a_failed_payment_of_an_invoice_meterline_made_makes_its_subscription_past_due(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    secret = settings.stripe_webhook_secret.get_secret_value()
    subscription_id, _ = seeded_subscription(engine)
    failed = invoice_event(
        "invoice.payment_failed", {"meterline_subscription_id": str(subscription_id)}
    )
    paid = invoice_event("invoice.paid", {"meterline_subscription_id": str(subscription_id)})

    assert post(client, failed, sign(failed, secret)).json()["outcome"] == "status_past_due"
    assert state(engine, subscription_id)[0] == "past_due"
    assert post(client, paid, sign(paid, secret)).json()["outcome"] == "status_active"


def test_an_invoice_event_naming_no_subscription_changes_none(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    secret = settings.stripe_webhook_secret.get_secret_value()
    # A subscription without a Stripe id: an event naming no subscription must not find it.
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session)
        plan = factories.make_plan(session)
        subscription_id = factories.make_subscription(session, organization, plan).id
    event = invoice_event("invoice.payment_failed", {})

    assert post(client, event, sign(event, secret)).json()["outcome"] == "unmatched"
    assert state(engine, subscription_id)[0] == "active"


def test_an_older_event_delivered_late_changes_nothing_and_counts_as_processed(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    secret = settings.stripe_webhook_secret.get_secret_value()
    subscription_id, stripe_id = seeded_subscription(engine)
    newer = subscription_event(
        stripe_id, "active", created=int(datetime(2026, 12, 1, 0, 5, tzinfo=UTC).timestamp())
    )
    assert post(client, newer, sign(newer, secret)).json()["outcome"] == "subscription_updated"
    after_newer = state(engine, subscription_id)
    older_id = f"evt_{secrets.token_hex(8)}"
    older = subscription_event(
        stripe_id,
        "past_due",
        older_id,
        created=int(datetime(2026, 12, 1, tzinfo=UTC).timestamp()),
        period=(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
    )

    response = post(client, older, sign(older, secret))
    again = post(client, older, sign(older, secret))

    assert response.json()["outcome"] == "stale"
    assert again.json()["outcome"] == "duplicate"
    assert state(engine, subscription_id) == after_newer
    assert after_newer[:2] == ("active", datetime(2026, 12, 1, tzinfo=UTC))


def test_a_stripe_period_off_our_anchor_grid_is_a_mismatch_not_a_move(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    secret = settings.stripe_webhook_secret.get_secret_value()
    subscription_id, stripe_id = seeded_subscription(engine)
    # Anchored on November 1st: December 15th to January 15th overlaps our December.
    payload = subscription_event(
        stripe_id,
        "past_due",
        period=(datetime(2026, 12, 15, tzinfo=UTC), datetime(2027, 1, 15, tzinfo=UTC)),
    )

    response = post(client, payload, sign(payload, secret))

    assert response.json()["outcome"] == "period_differs"
    status, period_start, _, _ = state(engine, subscription_id)
    assert (status, period_start) == ("past_due", datetime(2026, 11, 1, tzinfo=UTC))
    with engine.connect() as connection:
        found = connection.execute(
            sa.select(ReconciliationMismatch.kind, ReconciliationMismatch.theirs).where(
                ReconciliationMismatch.subscription_id == subscription_id
            )
        ).all()
    assert found == [("period_differs", "2026-12-15T00:00:00+00:00/2027-01-15T00:00:00+00:00")]


def everyone(engine: Engine) -> dict[Any, tuple[Any, ...]]:
    """Every subscription of the database (other tests' too), as a signed event could reach it."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(Subscription.id, Subscription.status, Subscription.updated_at)
        )
        return {row.id: tuple(row) for row in rows}


def recorded_outcome(engine: Engine, event_id: str) -> str:
    with engine.connect() as connection:
        return str(
            connection.execute(
                sa.select(StripeWebhookEvent.outcome).where(
                    StripeWebhookEvent.stripe_event_id == event_id
                )
            ).scalar_one()
        )


def event(kind: str, obj: dict[str, Any]) -> tuple[str, bytes]:
    event_id = f"evt_{secrets.token_hex(8)}"
    payload = {"id": event_id, "object": "event", "type": kind, "data": {"object": obj}}
    return event_id, json.dumps(payload).encode()


@pytest.mark.parametrize(
    ("kind", "status"),
    [("invoice.paid", "past_due"), ("invoice.payment_failed", "active")],
)
def test_an_invoice_without_a_subscription_changes_nothing_and_is_recorded_unmatched(
    client: TestClient, engine: Engine, settings: Settings, kind: str, status: str
) -> None:
    # Subscriptions not yet linked to Stripe, in the state the event would move them out of.
    with unit_of_work(engine) as session:
        for _ in range(2):
            factories.make_subscription(
                session,
                factories.make_organization(session),
                factories.make_plan(session),
                status=SubscriptionStatus(status),
            )
    before = everyone(engine)
    event_id, payload = event(kind, {"id": "in_one_off", "object": "invoice", "parent": None})

    response = post(
        client, payload, sign(payload, settings.stripe_webhook_secret.get_secret_value())
    )

    assert response.status_code == 200
    assert response.json()["outcome"] == "unmatched"
    assert everyone(engine) == before
    assert recorded_outcome(engine, event_id) == "unmatched"


def test_an_event_naming_two_of_our_subscriptions_changes_nothing(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    linked_id, stripe_id = seeded_subscription(engine)
    with unit_of_work(engine) as session:
        other = factories.make_subscription(
            session, factories.make_organization(session), factories.make_plan(session)
        )
        other_id = other.id
    before = everyone(engine)
    body = json.loads(subscription_event(stripe_id, "canceled"))
    body["data"]["object"]["metadata"] = {"meterline_subscription_id": str(other_id)}
    payload = json.dumps(body).encode()

    response = post(
        client, payload, sign(payload, settings.stripe_webhook_secret.get_secret_value())
    )

    assert response.json()["outcome"] == "unmatched"
    assert everyone(engine) == before
    assert {linked_id, other_id} <= before.keys()


def test_an_event_for_another_stripe_subscription_does_not_take_over_a_linked_one(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    linked_id, _ = seeded_subscription(engine)
    before = everyone(engine)
    body = json.loads(subscription_event(f"sub_{secrets.token_hex(6)}", "canceled"))
    body["data"]["object"]["metadata"] = {"meterline_subscription_id": str(linked_id)}
    payload = json.dumps(body).encode()

    response = post(
        client, payload, sign(payload, settings.stripe_webhook_secret.get_secret_value())
    )

    assert response.json()["outcome"] == "unmatched"
    assert everyone(engine) == before


def test_an_unlinked_subscription_is_linked_by_the_id_in_its_metadata(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    with unit_of_work(engine) as session:
        unlinked = factories.make_subscription(
            session, factories.make_organization(session), factories.make_plan(session)
        )
        unlinked_id = unlinked.id
    stripe_id = f"sub_{secrets.token_hex(6)}"
    body = json.loads(subscription_event(stripe_id, "active"))
    body["data"]["object"]["metadata"] = {"meterline_subscription_id": str(unlinked_id)}
    payload = json.dumps(body).encode()

    response = post(
        client, payload, sign(payload, settings.stripe_webhook_secret.get_secret_value())
    )

    assert response.json()["outcome"] == "subscription_updated"
    with engine.connect() as connection:
        linked = connection.execute(
            sa.select(Subscription.stripe_subscription_id).where(Subscription.id == unlinked_id)
        ).scalar_one()
    assert linked == stripe_id
