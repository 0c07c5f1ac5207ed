"""The one edge to Stripe: a small typed `BillingGateway` and its stripe-python implementation.

API version pinned, idempotency keys `meterline:<operation>:<stable id>`, calls paced under a rate
and retried with backoff on 429, 5xx and lost connections (with the same key, as Stripe advises).
A request Stripe refuses for good (400, 404, an idempotency conflict) raises `StripeRefused`,
which callers handle per request; anything else that fails raises `StripeUnavailable`, which stops
the run's Stripe work. Nothing else in Meterline imports `stripe` for API calls.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import stripe

from shared.errors import MeterlineError
from shared.logs import log_event

STRIPE_API_VERSION = "2026-10-28.endive"
logger = logging.getLogger("meterline.billing.stripe")


class StripeUnavailable(MeterlineError):
    code = "stripe_unavailable"
    status = 503


class StripeRefused(MeterlineError):
    """Stripe refused this request for good: sending it again unchanged cannot succeed."""

    code = "stripe_refused"
    status = 422


@dataclass(frozen=True)
class StripeSubscription:
    id: str
    customer_id: str
    status: str
    price_id: str | None
    unit_amount: int | None
    interval: str | None
    period_start: datetime | None
    period_end: datetime | None


@dataclass(frozen=True)
class MeterEvent:
    event_name: str
    customer_id: str
    value: int
    identifier: str
    timestamp: datetime


@dataclass(frozen=True)
class StripeInvoice:
    id: str
    status: str
    total: int
    currency: str
    meterline_invoice_id: str | None


@dataclass(frozen=True)
class InvoiceItem:
    """One of our invoice lines as an item of the Stripe invoice that collects it."""

    line_id: str
    amount: int
    currency: str
    description: str
    period_start: datetime
    period_end: datetime


class BillingGateway(Protocol):
    def report_meter_event(self, event: MeterEvent) -> None: ...

    def create_customer(self, organization_id: str, name: str) -> str: ...

    def get_subscription(self, stripe_subscription_id: str) -> StripeSubscription: ...

    def meter_total(
        self, event_name: str, customer_id: str, start: datetime, end: datetime
    ) -> int: ...

    def find_invoice(self, invoice_id: str) -> StripeInvoice | None: ...

    def create_invoice(
        self,
        invoice_id: str,
        customer_id: str,
        currency: str,
        description: str,
        metadata: dict[str, str],
    ) -> StripeInvoice: ...

    def invoice_line_ids(self, stripe_invoice_id: str) -> set[str]: ...

    def add_invoice_item(
        self, stripe_invoice_id: str, customer_id: str, invoice_id: str, item: InvoiceItem
    ) -> None: ...

    def finalize_invoice(self, stripe_invoice_id: str, invoice_id: str) -> StripeInvoice: ...

    def get_invoice(self, stripe_invoice_id: str) -> StripeInvoice: ...


def _epoch(moment: datetime) -> int:
    return int(moment.timestamp())


def _from_epoch(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value, tz=UTC) if value else None


class _Pacer:
    """At most `rate` calls per second across threads (Stripe allows about 1,000/s per account)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_at = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            delay = self.next_at - now
            self.next_at = max(now, self.next_at) + self.interval
        if delay > 0:
            time.sleep(delay)


class StripeGateway:
    def __init__(
        self,
        api_key: str,
        api_base: str,
        *,
        rate_per_second: float = 25.0,
        max_retries: int = 5,
        backoff_seconds: float = 0.5,
    ) -> None:
        self.client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base},
            stripe_version=STRIPE_API_VERSION,
            max_network_retries=0,
        )
        self.pacer = _Pacer(rate_per_second)
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self._meters: dict[str, str] | None = None

    def _call(self, operation: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(self.max_retries + 1):
            self.pacer.wait()
            try:
                return func(*args, **kwargs)
            except stripe.RateLimitError:
                if attempt == self.max_retries:
                    raise StripeUnavailable(f"Stripe kept rate limiting {operation}") from None
                delay = self.backoff_seconds * 2**attempt
                log_event(logger, "stripe_rate_limited", operation=operation, retry_in=delay)
                time.sleep(delay)
            except (stripe.APIConnectionError, stripe.APIError) as exc:
                if attempt == self.max_retries:
                    raise StripeUnavailable(
                        f"Stripe unreachable for {operation}: {exc.user_message or 'no answer'}"
                    ) from None
                time.sleep(self.backoff_seconds * 2**attempt)
            except (stripe.InvalidRequestError, stripe.IdempotencyError, stripe.CardError) as exc:
                raise StripeRefused(
                    f"Stripe refused {operation}: {exc.user_message or type(exc).__name__}"
                ) from None
            except stripe.StripeError as exc:
                raise StripeUnavailable(
                    f"Stripe refused {operation}: {exc.user_message or type(exc).__name__}"
                ) from None
        raise AssertionError("unreachable")

    def report_meter_event(self, event: MeterEvent) -> None:
        self._call(
            "meter_event",
            self.client.v1.billing.meter_events.create,
            {
                "event_name": event.event_name,
                "identifier": event.identifier,
                "timestamp": _epoch(event.timestamp),
                "payload": {"stripe_customer_id": event.customer_id, "value": str(event.value)},
            },
            {"idempotency_key": f"meterline:meter_event:{event.identifier}"},
        )

    def create_customer(self, organization_id: str, name: str) -> str:
        customer = self._call(
            "create_customer",
            self.client.v1.customers.create,
            {"name": name, "metadata": {"meterline_organization_id": organization_id}},
            {"idempotency_key": f"meterline:create_customer:{organization_id}"},
        )
        return str(customer.id)

    def get_subscription(self, stripe_subscription_id: str) -> StripeSubscription:
        found = self._call(
            "get_subscription", self.client.v1.subscriptions.retrieve, stripe_subscription_id
        )
        return subscription_from_stripe(found)

    def meter_total(self, event_name: str, customer_id: str, start: datetime, end: datetime) -> int:
        meter_id = self._meter_id(event_name)
        if meter_id is None:
            return 0
        summaries = self._call(
            "meter_event_summaries",
            self.client.v1.billing.meters.event_summaries.list,
            meter_id,
            {"customer": customer_id, "start_time": _epoch(start), "end_time": _epoch(end)},
        )
        return int(sum(int(summary.aggregated_value) for summary in summaries.auto_paging_iter()))

    def find_invoice(self, invoice_id: str) -> StripeInvoice | None:
        """The Stripe invoice created for ours, if any: a create whose answer was lost more than
        a day ago is no longer covered by its idempotency key."""
        found = self._call(
            "search_invoices",
            self.client.v1.invoices.search,
            {"query": f"metadata['meterline_invoice_id']:'{invoice_id}'", "limit": 10},
        )
        for invoice in found.data:
            candidate = invoice_from_stripe(invoice)
            if candidate.meterline_invoice_id == invoice_id:
                return candidate
        return None

    def create_invoice(
        self,
        invoice_id: str,
        customer_id: str,
        currency: str,
        description: str,
        metadata: dict[str, str],
    ) -> StripeInvoice:
        # A draft that does not advance by itself: nothing is charged until every line is on it
        # and it is finalized below; pending invoice items of the customer stay out of it.
        created = self._call(
            "create_invoice",
            self.client.v1.invoices.create,
            {
                "customer": customer_id,
                "currency": currency,
                "collection_method": "charge_automatically",
                "auto_advance": False,
                "pending_invoice_items_behavior": "exclude",
                "description": description[:500],
                "metadata": {"meterline_invoice_id": invoice_id, **metadata},
            },
            {"idempotency_key": f"meterline:create_invoice:{invoice_id}"},
        )
        return invoice_from_stripe(created)

    def invoice_line_ids(self, stripe_invoice_id: str) -> set[str]:
        """Our line ids already on the Stripe invoice (from each item's metadata)."""
        lines = self._call(
            "list_invoice_lines",
            self.client.v1.invoices.line_items.list,
            stripe_invoice_id,
            {"limit": 100},
        )
        return {
            str(line.metadata["meterline_line_id"])
            for line in lines.auto_paging_iter()
            if line.metadata and "meterline_line_id" in line.metadata
        }

    def add_invoice_item(
        self, stripe_invoice_id: str, customer_id: str, invoice_id: str, item: InvoiceItem
    ) -> None:
        self._call(
            "create_invoice_item",
            self.client.v1.invoice_items.create,
            {
                "customer": customer_id,
                "invoice": stripe_invoice_id,
                "amount": item.amount,
                "currency": item.currency,
                "description": item.description[:500],
                "period": {"start": _epoch(item.period_start), "end": _epoch(item.period_end)},
                "metadata": {"meterline_invoice_id": invoice_id, "meterline_line_id": item.line_id},
            },
            {"idempotency_key": f"meterline:invoice_item:{item.line_id}"},
        )

    def finalize_invoice(self, stripe_invoice_id: str, invoice_id: str) -> StripeInvoice:
        # auto_advance from here on: Stripe charges the customer's default payment method.
        finalized = self._call(
            "finalize_invoice",
            self.client.v1.invoices.finalize_invoice,
            stripe_invoice_id,
            {"auto_advance": True},
            {"idempotency_key": f"meterline:finalize_invoice:{invoice_id}"},
        )
        return invoice_from_stripe(finalized)

    def get_invoice(self, stripe_invoice_id: str) -> StripeInvoice:
        return invoice_from_stripe(
            self._call("get_invoice", self.client.v1.invoices.retrieve, stripe_invoice_id)
        )

    def _meter_id(self, event_name: str) -> str | None:
        if self._meters is None:
            listed = self._call("list_meters", self.client.v1.billing.meters.list, {"limit": 100})
            self._meters = {meter.event_name: meter.id for meter in listed.auto_paging_iter()}
        return self._meters.get(event_name)


def subscription_from_stripe(obj: stripe.Subscription | dict[str, Any]) -> StripeSubscription:
    """Our view of a Stripe subscription (or a webhook's object). Since the 2025 API versions the
    period lives on the subscription items; older payloads keep it on the subscription."""
    found: dict[str, Any] = obj.to_dict() if isinstance(obj, stripe.StripeObject) else obj
    items = found["items"]["data"] if found.get("items") else []
    item = items[0] if items else None
    price = item["price"] if item else None
    recurring = price.get("recurring") if price else None
    start = (item.get("current_period_start") if item else None) or found.get(
        "current_period_start"
    )
    end = (item.get("current_period_end") if item else None) or found.get("current_period_end")
    customer = found.get("customer")
    return StripeSubscription(
        id=str(found["id"]),
        customer_id=str(customer if isinstance(customer, str) else (customer or {}).get("id", "")),
        status=str(found["status"]),
        price_id=str(price["id"]) if price else None,
        unit_amount=price.get("unit_amount") if price else None,
        interval=recurring.get("interval") if recurring else None,
        period_start=_from_epoch(start),
        period_end=_from_epoch(end),
    )


def invoice_from_stripe(obj: stripe.Invoice | dict[str, Any]) -> StripeInvoice:
    found: dict[str, Any] = obj.to_dict() if isinstance(obj, stripe.StripeObject) else obj
    metadata = found.get("metadata") or {}
    return StripeInvoice(
        id=str(found["id"]),
        status=str(found.get("status") or ""),
        total=int(found.get("total") or 0),
        currency=str(found.get("currency") or ""),
        meterline_invoice_id=metadata.get("meterline_invoice_id"),
    )
