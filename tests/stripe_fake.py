"""A small stateful Stripe fake at the HTTP boundary, for the state that neither stripe-mock
(stateless) nor localstripe (no Prices, no Billing Meters, pre-2025 object shapes) keeps:
customers, prices, subscriptions, meter events and their summaries, invoices and invoice items.

Every request is first forwarded to stripe-mock, which validates it against Stripe's OpenAPI
document; a request stripe-mock refuses is refused here with its answer. So the fake adds state,
and stripe-mock stays the check of request shapes. Idempotency keys replay the first answer, as
Stripe does, until `expire_idempotency()`; meter event identifiers are deduplicated until
`forget_identifiers()` (Stripe's window is 24 hours). An invoice's total is the sum of its items,
read back from the fake's own state, never from what the client claims.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import httpx
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


class _Invoices:
    """The invoice routes of FakeStripe (a mixin: they share its state)."""

    invoices: dict[str, dict[str, Any]]
    invoice_items: dict[str, dict[str, Any]]

    def _invoice(self, invoice: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _route_invoices(
        self, method: str, path: str, params: dict[str, Any]
    ) -> tuple[int, Any] | None:
        if path == "/v1/invoices" and method == "POST":
            invoice = {
                "id": f"in_{secrets.token_hex(6)}",
                "object": "invoice",
                "customer": params["customer"],
                "currency": params.get("currency", "usd"),
                "status": "draft",
                "auto_advance": params.get("auto_advance") == "true",
                "collection_method": params.get("collection_method"),
                "description": params.get("description"),
                "metadata": params.get("metadata", {}),
            }
            self.invoices[invoice["id"]] = invoice
            return 200, self._invoice(invoice)
        if path == "/v1/invoices/search" and method == "GET":
            found = re.fullmatch(r"metadata\['meterline_invoice_id'\]:'([^']+)'", params["query"])
            wanted = found.group(1) if found else None
            data = [
                self._invoice(i)
                for i in self.invoices.values()
                if (i.get("metadata") or {}).get("meterline_invoice_id") == wanted
            ]
            return 200, {"object": "search_result", "data": data, "has_more": False, "url": path}
        found = re.fullmatch(r"/v1/invoices/([^/]+)(/finalize|/lines)?", path)
        if found and found.group(1) != "search":
            invoice = self.invoices.get(found.group(1))
            if invoice is None:
                return 404, {
                    "error": {"type": "invalid_request_error", "message": "No such invoice"}
                }
            action = found.group(2)
            if action == "/finalize" and method == "POST":
                if invoice["status"] != "draft":
                    message = "This invoice is already finalized"
                    return 400, {"error": {"type": "invalid_request_error", "message": message}}
                invoice["status"] = "paid" if self.invoice_total(invoice["id"]) <= 0 else "open"
                invoice["auto_advance"] = params.get("auto_advance") == "true"
                return 200, self._invoice(invoice)
            if action == "/lines" and method == "GET":
                data = [
                    {
                        "id": f"il_{item['id']}",
                        "object": "line_item",
                        "amount": int(item["amount"]),
                        "currency": item["currency"],
                        "description": item.get("description"),
                        "metadata": item.get("metadata", {}),
                        "period": item.get("period"),
                    }
                    for item in self.invoice_items.values()
                    if item.get("invoice") == invoice["id"]
                ]
                return 200, {"object": "list", "data": data, "has_more": False, "url": path}
            if action is None and method == "GET":
                return 200, self._invoice(invoice)
        if path == "/v1/invoiceitems" and method == "POST":
            invoice = self.invoices.get(params.get("invoice", ""))
            if invoice is None or invoice["status"] != "draft":
                message = "Invoice items can only be added to draft invoices"
                return 400, {"error": {"type": "invalid_request_error", "message": message}}
            item = {
                "id": f"ii_{secrets.token_hex(6)}",
                "object": "invoiceitem",
                "customer": params["customer"],
                "invoice": invoice["id"],
                "amount": int(params["amount"]),
                "currency": params["currency"],
                "description": params.get("description"),
                "metadata": params.get("metadata", {}),
                "period": {k: int(v) for k, v in (params.get("period") or {}).items()},
            }
            self.invoice_items[item["id"]] = item
            return 200, item
        return None


class FakeStripe(_Invoices):
    def __init__(self, stripe_mock_base: str) -> None:
        self.stripe_mock_base = stripe_mock_base
        self.customers: dict[str, dict[str, Any]] = {}
        self.prices: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.meters = {"api_calls": "mtr_api_calls", "exports": "mtr_exports"}
        self.meter_events: dict[str, dict[str, Any]] = {}
        # Every meter event kept (a resend after the identifier window counts again).
        self.meter_event_log: list[dict[str, Any]] = []
        self.meter_event_requests = 0
        self.refuse_customers: set[str] = set()
        self.invoices: dict[str, dict[str, Any]] = {}
        self.invoice_items: dict[str, dict[str, Any]] = {}
        self.replies: dict[str, tuple[int, Any]] = {}
        self.rate_limit_next = 0
        self.lock = threading.Lock()
        self.app = Starlette(routes=[Route("/{path:path}", self.handle, methods=["GET", "POST"])])
        self.base = ""

    def meter_total(self, event_name: str, customer_id: str, start: int, end: int) -> int:
        return sum(
            int(e["payload"]["value"])
            for e in self.meter_event_log
            if e["event_name"] == event_name
            and e["payload"]["stripe_customer_id"] == customer_id
            and start <= int(e["timestamp"]) < end
        )

    def forget_identifiers(self) -> None:
        """Past Stripe's identifier window: a resent identifier is a new event."""
        self.meter_events.clear()

    def expire_idempotency(self) -> None:
        """Past Stripe's 24 hours of idempotency keys: a repeated key is a new request."""
        self.replies.clear()

    def invoice_total(self, invoice_id: str) -> int:
        return sum(
            int(item["amount"])
            for item in self.invoice_items.values()
            if item.get("invoice") == invoice_id
        )

    def _invoice(self, invoice: dict[str, Any]) -> dict[str, Any]:
        total = self.invoice_total(invoice["id"]) + int(invoice.get("edited_by_hand", 0))
        return {**invoice, "total": total, "amount_due": max(total, 0), "subtotal": total}

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
            customer = params["payload"]["stripe_customer_id"]
            if customer in self.refuse_customers:
                message = f"No such customer: '{customer}'"
                return 400, {"error": {"type": "invalid_request_error", "message": message}}
            event = {"object": "billing.meter_event", "created": now, **params}
            if params["identifier"] not in self.meter_events:
                self.meter_events[params["identifier"]] = event
                self.meter_event_log.append(event)
            return 200, event
        answer = self._route_invoices(method, path, params)
        if answer is not None:
            return answer
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


@contextlib.contextmanager
def running_fake(stripe_mock_base: str) -> Iterator[FakeStripe]:
    """The fake on a free port of loopback, for the block's duration."""
    fake = FakeStripe(stripe_mock_base)
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
