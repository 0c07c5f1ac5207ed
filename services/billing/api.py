"""HTTP adaptation of the Stripe webhook: bound the body, verify the signature, hand the event to
the service."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import stripe
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from services.billing.webhooks import apply_stripe_event
from shared.errors import PayloadTooLarge
from shared.http_body import read_body
from shared.logs import log_event

logger = logging.getLogger("meterline.billing.webhook")
# Stripe's own default: a signature older than five minutes is a replay, not a delivery.
SIGNATURE_TOLERANCE_SECONDS = 300
# Stripe's events are a few kilobytes; anything near this is not Stripe. Checked before the body
# is read (and while it streams): the process also runs the billing scheduler.
MAX_WEBHOOK_BYTES = 1024 * 1024


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def webhook_endpoint(engine: Engine, secret: str) -> Callable[[Request], Awaitable[JSONResponse]]:
    async def receive(request: Request) -> JSONResponse:
        if not secret:
            return _error(503, "not_configured", "the webhook endpoint secret is not configured")
        try:
            payload = await read_body(request, MAX_WEBHOOK_BYTES)
        except PayloadTooLarge as exc:
            log_event(logger, "stripe_webhook_rejected", reason="too_large")
            return _error(413, exc.code, exc.message)
        except ClientDisconnect:
            return _error(400, "disconnected", "the body was not received")
        try:
            event = stripe.Webhook.construct_event(
                payload,
                request.headers.get("stripe-signature", ""),
                secret,
                tolerance=SIGNATURE_TOLERANCE_SECONDS,
            )
        except stripe.SignatureVerificationError:
            log_event(logger, "stripe_webhook_rejected", reason="signature")
            return _error(400, "bad_signature", "signature missing, invalid or too old")
        except ValueError:
            return _error(400, "invalid", "body is not a Stripe event")
        document = event.to_dict()

        def apply() -> str:
            with engine.begin() as connection:
                return apply_stripe_event(connection, document)

        outcome = await run_in_threadpool(apply)
        log_event(logger, "stripe_webhook_applied", type=document["type"], outcome=outcome)
        return JSONResponse({"received": True, "outcome": outcome})

    return receive
