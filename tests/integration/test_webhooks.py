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
from shared.models import Subscription
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


def subscription_event(stripe_id: str, status: str, event_id: str | None = None) -> bytes:
    start = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp())
    end = int(datetime(2027, 1, 1, tzinfo=UTC).timestamp())
    return json.dumps(
        {
            "id": event_id or f"evt_{secrets.token_hex(8)}",
            "object": "event",
            "type": "customer.subscription.updated",
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
