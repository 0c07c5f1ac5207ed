"""The one edge to Stripe: a small typed `BillingGateway` and its stripe-python implementation.

API version pinned, idempotency keys `meterline:<operation>:<stable id>`, calls paced under a rate
and retried with backoff on 429. Nothing else in Meterline imports `stripe` for API calls.
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


class BillingGateway(Protocol):
    def report_meter_event(self, event: MeterEvent) -> None: ...

    def create_customer(self, organization_id: str, name: str) -> str: ...

    def ensure_price(
        self, plan_id: str, plan_name: str, interval: str, unit_amount: int, currency: str
    ) -> str: ...

    def create_subscription(
        self,
        subscription_id: str,
        customer_id: str,
        price_id: str,
        period_start: datetime,
        period_end: datetime,
    ) -> str: ...

    def get_subscription(self, stripe_subscription_id: str) -> StripeSubscription: ...

    def meter_total(
        self, event_name: str, customer_id: str, start: datetime, end: datetime
    ) -> int: ...


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
            except stripe.APIConnectionError as exc:
                if attempt == self.max_retries:
                    raise StripeUnavailable(
                        f"Stripe unreachable for {operation}: {exc.user_message or 'no answer'}"
                    ) from None
                time.sleep(self.backoff_seconds * 2**attempt)
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

    def ensure_price(
        self, plan_id: str, plan_name: str, interval: str, unit_amount: int, currency: str
    ) -> str:
        product = self._call(
            "create_product",
            self.client.v1.products.create,
            {"name": plan_name, "metadata": {"meterline_plan_id": plan_id}},
            {"idempotency_key": f"meterline:create_product:{plan_id}"},
        )
        price = self._call(
            "create_price",
            self.client.v1.prices.create,
            {
                "product": product.id,
                "currency": currency,
                "unit_amount": unit_amount,
                "recurring": {"interval": interval},
                "metadata": {"meterline_plan_id": plan_id},
            },
            {"idempotency_key": f"meterline:create_price:{plan_id}:{interval}:{unit_amount}"},
        )
        return str(price.id)

    def create_subscription(
        self,
        subscription_id: str,
        customer_id: str,
        price_id: str,
        period_start: datetime,
        period_end: datetime,
    ) -> str:
        # Backdated to our period's start and anchored at its end, so Stripe's first period is ours.
        created = self._call(
            "create_subscription",
            self.client.v1.subscriptions.create,
            {
                "customer": customer_id,
                "items": [{"price": price_id}],
                "backdate_start_date": _epoch(period_start),
                "billing_cycle_anchor": _epoch(period_end),
                "proration_behavior": "none",
                "metadata": {"meterline_subscription_id": subscription_id},
            },
            {"idempotency_key": f"meterline:create_subscription:{subscription_id}"},
        )
        return str(created.id)

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
