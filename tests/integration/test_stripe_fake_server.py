"""A small stateful Stripe fake at the HTTP boundary, for the state that neither stripe-mock
(stateless) nor localstripe (no Prices, no Billing Meters, pre-2025 subscription shape) keeps:
customers, prices, subscriptions and meter event summaries.

Every request is first forwarded to stripe-mock, which validates it against Stripe's OpenAPI
document; a request stripe-mock refuses is refused here with its answer. So the fake adds state,
and stripe-mock stays the check of request shapes. Idempotency keys replay the first answer, as
Stripe does.
"""

from __future__ import annotations

import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import stripe
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def _nest(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding (items[0][price]=x) back into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = re.findall(r"[^\[\]]+", key)
        node: Any = root
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            if isinstance(node, list):
                position = int(part)
                while len(node) <= position:
                    node.append({})
                if last:
                    node[position] = value
                else:
                    node = node[position]
                continue
            if last:
                node[part] = value
            else:
                following = parts[index + 1]
                node = node.setdefault(part, [] if following.isdigit() else {})
    return root


class FakeStripe:
    def __init__(self, stripe_mock_base: str) -> None:
        self.stripe_mock_base = stripe_mock_base
        self.customers: dict[str, dict[str, Any]] = {}
        self.prices: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.meters = {"api_calls": "mtr_api_calls", "exports": "mtr_exports"}
        self.meter_events: dict[str, dict[str, Any]] = {}
        self.meter_event_requests = 0
        self.replies: dict[str, tuple[int, Any]] = {}
        self.rate_limit_next = 0
        self.lock = threading.Lock()
        self.app = Starlette(routes=[Route("/{path:path}", self.handle, methods=["GET", "POST"])])
        self.base = ""

    def meter_total(self, event_name: str, customer_id: str, start: int, end: int) -> int:
        return sum(
            int(e["payload"]["value"])
            for e in self.meter_events.values()
            if e["event_name"] == event_name
            and e["payload"]["stripe_customer_id"] == customer_id
            and start <= int(e["timestamp"]) < end
        )

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("authorization", "stripe-version", "content-type", "idempotency-key")
        }
        async with httpx.AsyncClient(base_url=self.stripe_mock_base, timeout=10) as client:
            checked = await client.request(
                request.method,
                request.url.path,
                params=request.query_params,
                content=body,
                headers=headers,
            )
        if checked.status_code >= 400:
            return Response(checked.content, checked.status_code, media_type="application/json")
        params = _nest(parse_qsl(body.decode())) if body else dict(request.query_params)
        key = request.headers.get("idempotency-key")
        with self.lock:
            if request.url.path == "/v1/billing/meter_events" and self.rate_limit_next > 0:
                self.rate_limit_next -= 1
                error = {"error": {"type": "invalid_request_error", "message": "Too many requests"}}
                return JSONResponse(error, status_code=429)
            if request.url.path == "/v1/billing/meter_events":
                self.meter_event_requests += 1
            if key and key in self.replies:
                status, document = self.replies[key]
                return JSONResponse(document, status_code=status)
            status, document = self.route(request.method, request.url.path, params)
            if key and request.method == "POST":
                self.replies[key] = (status, document)
        return JSONResponse(document, status_code=status)

    def route(self, method: str, path: str, params: dict[str, Any]) -> tuple[int, Any]:
        now = int(time.time())
        if path == "/v1/customers" and method == "POST":
            customer = {"id": f"cus_{secrets.token_hex(6)}", "object": "customer", **params}
            self.customers[customer["id"]] = customer
            return 200, customer
        if path == "/v1/products" and method == "POST":
            return 200, {"id": f"prod_{secrets.token_hex(6)}", "object": "product", **params}
        if path == "/v1/prices" and method == "POST":
            price = {
                "id": f"price_{secrets.token_hex(6)}",
                "object": "price",
                "currency": params["currency"],
                "unit_amount": int(params["unit_amount"]),
                "recurring": {"interval": params["recurring"]["interval"]},
            }
            self.prices[price["id"]] = price
            return 200, price
        if path == "/v1/subscriptions" and method == "POST":
            price = self.prices[params["items"][0]["price"]]
            subscription = {
                "id": f"sub_{secrets.token_hex(6)}",
                "object": "subscription",
                "customer": params["customer"],
                "status": "active",
                "metadata": params.get("metadata", {}),
                "items": {
                    "object": "list",
                    "data": [
                        {
                            "id": f"si_{secrets.token_hex(6)}",
                            "object": "subscription_item",
                            "price": price,
                            "current_period_start": int(params["backdate_start_date"]),
                            "current_period_end": int(params["billing_cycle_anchor"]),
                        }
                    ],
                },
            }
            self.subscriptions[subscription["id"]] = subscription
            return 200, subscription
        found = re.fullmatch(r"/v1/subscriptions/([^/]+)", path)
        if found and method == "GET":
            subscription = self.subscriptions.get(found.group(1))
            if subscription is None:
                return 404, {"error": {"type": "invalid_request_error", "message": "No such sub"}}
            return 200, subscription
        if path == "/v1/billing/meters" and method == "GET":
            data = [
                {"id": meter_id, "object": "billing.meter", "event_name": name}
                for name, meter_id in self.meters.items()
            ]
            return 200, {"object": "list", "data": data, "has_more": False, "url": path}
        if path == "/v1/billing/meter_events" and method == "POST":
            event = {"object": "billing.meter_event", "created": now, **params}
            self.meter_events.setdefault(params["identifier"], event)
            return 200, event
        found = re.fullmatch(r"/v1/billing/meters/([^/]+)/event_summaries", path)
        if found and method == "GET":
            name = next(n for n, m in self.meters.items() if m == found.group(1))
            value = self.meter_total(
                name, params["customer"], int(params["start_time"]), int(params["end_time"])
            )
            summary = {
                "id": f"mtrusg_{secrets.token_hex(4)}",
                "object": "billing.meter_event_summary",
                "aggregated_value": value,
                "meter": found.group(1),
                "start_time": int(params["start_time"]),
                "end_time": int(params["end_time"]),
            }
            return 200, {"object": "list", "data": [summary], "has_more": False, "url": path}
        return 404, {"error": {"type": "invalid_request_error", "message": f"fake: {path}"}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(name="fake_stripe")
def fake_stripe_fixture(local_env: dict[str, str]) -> Iterator[FakeStripe]:
    fake = FakeStripe(local_env["STRIPE_API_BASE"])
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(fake.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    fake.base = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_the_fake_refuses_what_stripe_mock_refuses(fake_stripe: FakeStripe) -> None:
    client = stripe.StripeClient("sk_test_123", base_addresses={"api": fake_stripe.base})
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.billing.meter_events.create(
            {"event_name": "api_calls", "payload": {"value": "1"}, "bogus_field": "x"}  # type: ignore[typeddict-unknown-key]
        )
    assert fake_stripe.meter_event_requests == 0


def test_the_fake_keeps_meter_events_once_per_identifier(fake_stripe: FakeStripe) -> None:
    client = stripe.StripeClient("sk_test_123", base_addresses={"api": fake_stripe.base})
    event = {
        "event_name": "api_calls",
        "identifier": "ml_x",
        "timestamp": int(time.time()),
        "payload": {"stripe_customer_id": "cus_1", "value": "7"},
    }
    client.v1.billing.meter_events.create(event)  # type: ignore[arg-type]
    client.v1.billing.meter_events.create(event)  # type: ignore[arg-type]
    assert fake_stripe.meter_total("api_calls", "cus_1", 0, 2**31) == 7
