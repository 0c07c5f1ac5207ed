"""HTTP adaptation: read the request, call the service, map its errors to status codes.

Every error is rendered as {"error": {"code", "message", "details"}}; 429 and 503 carry Retry-After.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from services.ingest import metrics
from services.ingest.dropins import api as dropins
from services.ingest.keycache import Admission
from services.ingest.openapi import openapi_document
from services.ingest.publisher import RETRY_AFTER_SECONDS
from services.ingest.schemas import Accepted, encoder
from services.ingest.service import IngestService, KeyOverLimit
from shared.apikeys import VerifiedKey
from shared.errors import (
    InvalidInput,
    MeterlineError,
    RateLimited,
    Unauthenticated,
    UnsupportedMediaType,
)
from shared.events import MAX_BODY_BYTES, parse_timestamp
from shared.http_body import read_body
from shared.logs import log_event, redact

logger = logging.getLogger("meterline.ingest")

JSON = "application/json"
USAGE_PARAMETERS = frozenset({"metric", "from", "to", "group_by", "granularity", "customer"})


def _service(request: Request) -> IngestService:
    service: IngestService = request.app.state.service
    return service


def error_response(exc: MeterlineError) -> Response:
    status, headers, body = _error_parts(exc)
    return Response(body, status, headers, JSON)


def _error_parts(exc: MeterlineError) -> tuple[int, dict[str, str], bytes]:
    headers = {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    elif exc.status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    elif exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if exc.details is None:
        return exc.status, headers, _rendered(exc.code, exc.message)
    return exc.status, headers, _render(exc.to_dict())


@functools.lru_cache(maxsize=256)
def _rendered(code: str, message: str) -> bytes:
    # The refusals a flood gets (401, 429) have a fixed text: rendered once, not per request.
    return _render({"error": {"code": code, "message": message}})


def _render(document: dict[str, Any]) -> bytes:
    # Error bodies may quote what the client sent (a field name, a value); a key pasted there by
    # mistake is not sent back.
    try:
        encoded = encoder.encode(document)
    except UnicodeEncodeError:
        # A quoted field name held a lone surrogate, which UTF-8 cannot carry: escape it.
        encoded = encoder.encode(_escape_surrogates(document))
    return redact(encoded.decode()).encode()


def _escape_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode()
    if isinstance(value, dict):
        return {_escape_surrogates(k): _escape_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_surrogates(v) for v in value]
    return value


# The routes that need a key, authenticated by `authenticate_first` before the framework runs.
AUTHENTICATED = frozenset(
    {("POST", "/v1/events"), ("GET", "/v1/usage"), *(("POST", path) for path in dropins.PATHS)}
)
_KEY = "meterline.key"


def _stranger_refusal(exc: MeterlineError) -> bool:
    """A refusal of the key itself (unknown, or its address or the strangers' budget over the
    limit), not a verified key's own limit or a database outage."""
    return isinstance(exc, Unauthenticated) or (
        isinstance(exc, RateLimited) and not isinstance(exc, KeyOverLimit)
    )


def authenticate_first(app: Starlette) -> AuthenticateFirst:
    return AuthenticateFirst(app)


class AuthenticateFirst:
    """The ASGI app uvicorn runs: requests to AUTHENTICATED routes are authenticated here,
    before routing, middleware or a Request object, so that a made-up key (the bulk of a flood)
    is refused in a few microseconds with a pre-rendered body. The verified key travels on in
    the scope for the endpoint. `screen` answers the front door (frontdoor.py), which refuses
    what needs no waiting before a request even reaches this app."""

    def __init__(self, app: Starlette) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) not in AUTHENTICATED:
            await self.app(scope, receive, send)
            return
        service: IngestService = self.app.state.service
        try:
            scope[_KEY] = await service.authenticate(
                _authorization(scope), _client(scope), scope.get(ADMITTED)
            )
        except MeterlineError as exc:
            if _stranger_refusal(exc):
                scope[REFUSED] = True  # the front door reads this connection's next request later
            await _send_refusal(send, refusal_parts(exc, scope["path"]))
            return
        except Exception as exc:
            log_event(
                logger, "request_failed", logging.ERROR, path=scope["path"], error=repr(exc)[:300]
            )
            await _send_refusal(
                send, refusal_parts(MeterlineError("internal error"), scope["path"])
            )
            return
        await self.app(scope, receive, send)

    def screen(
        self, method: str, path: str, authorization: str | None, client: str | None
    ) -> Refusal | Admission | None:
        """The answer __call__ would give this request without waiting on anything; else what
        was taken to let it through (to be put in its scope under ADMITTED), or None."""
        if (method, path) not in AUTHENTICATED:
            return None
        service: IngestService | None = getattr(self.app.state, "service", None)
        if service is None:  # not started yet
            return None
        screened = service.screen(authorization, client)
        if isinstance(screened, Admission):
            return screened
        return refusal_parts(screened, path)


Refusal = tuple[int, list[tuple[bytes, bytes]], bytes]
# Scope keys: what the front door took for a request it let through (KeyCache.screen), and the
# mark of a request this app refused.
ADMITTED = "meterline.admitted"
REFUSED = "meterline.refused"


def _authorization(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return str(value.decode("latin-1"))
    return None


def _client(scope: Scope) -> str | None:
    # The peer address, or the one X-Forwarded-For names when the peer is a proxy uvicorn
    # trusts (FORWARDED_ALLOW_IPS): the unit failed authentications are limited by.
    client = scope.get("client")
    return str(client[0]) if client else None


async def _send_refusal(send: Send, refusal: Refusal) -> None:
    status, headers, body = refusal
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def refusal_parts(exc: MeterlineError, path: str) -> Refusal:
    """Status, raw headers and body of a refusal on `path` (counted on /v1/events)."""
    if path == "/v1/events":
        _REQUESTS_BY_STATUS[exc.status].inc()
    renderer = dropins.error_renderer(path)
    if renderer is not None:
        # A drop-in client reads refusals in its own API's document.
        status, headers, body, media_type = renderer(exc)
        raw = [(b"content-type", media_type.encode()), (b"content-length", str(len(body)).encode())]
        raw += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
        return status, raw, body
    status, headers, body = _error_parts(exc)
    return status, _raw(headers, body), body


class _CountersByStatus(dict[int, Any]):
    # The counter of each status, looked up once: a flood's refusals are counted, not labelled.
    def __missing__(self, status: int) -> Any:
        counter = self[status] = metrics.REQUESTS.labels(str(status))
        return counter


_REQUESTS_BY_STATUS = _CountersByStatus()


def _raw(headers: dict[str, str], body: bytes) -> list[tuple[bytes, bytes]]:
    if len(headers) == 1:
        [(name, value)] = headers.items()
        return list(_raw_one(name, value, len(body)))
    raw = [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]
    return raw + [(name.lower().encode(), value.encode()) for name, value in headers.items()]


@functools.lru_cache(maxsize=64)
def _raw_one(name: str, value: str, length: int) -> tuple[tuple[bytes, bytes], ...]:
    # A 401 or a 429 with Retry-After: a handful of distinct header sets, built once each.
    return (
        (b"content-type", JSON.encode()),
        (b"content-length", str(length).encode()),
        (name.lower().encode(), value.encode()),
    )


def _verified_key(request: Request) -> VerifiedKey:
    key: VerifiedKey = request.scope[_KEY]
    return key


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == JSON or (media.startswith("application/") and media.endswith("+json"))


async def post_events(request: Request) -> Response:
    service = _service(request)
    key = _verified_key(request)
    try:
        if not _is_json(request.headers.get("content-type")):
            raise UnsupportedMediaType("send the events as application/json")
        accepted = await service.ingest(key, await read_body(request, MAX_BODY_BYTES))
    except ClientDisconnect:
        # The client left mid-body: nothing was published, and nobody is there to answer.
        metrics.REQUESTS.labels("499").inc()
        return Response(status_code=499)
    except MeterlineError as exc:
        metrics.REQUESTS.labels(str(exc.status)).inc()
        return error_response(exc)
    metrics.REQUESTS.labels("202").inc()
    return Response(encoder.encode(Accepted(accepted)), 202, media_type=JSON)


async def get_usage(request: Request) -> Response:
    service = _service(request)
    params = request.query_params
    key = _verified_key(request)
    try:
        filters = {
            name[len("filter[") : -1]: params[name]
            for name in params
            if name.startswith("filter[") and name.endswith("]")
        }
        unknown = set(params) - USAGE_PARAMETERS - {f"filter[{name}]" for name in filters}
        if unknown:
            raise InvalidInput(f"unknown query parameter(s): {', '.join(sorted(unknown))}")
        # group_by may be given more than once, or as a comma-separated list.
        repeated = sorted(
            name for name in set(params) if name != "group_by" and len(params.getlist(name)) > 1
        )
        if repeated:
            raise InvalidInput(f"given more than once: {', '.join(repeated)}")
        group_by = [g for value in params.getlist("group_by") for g in value.split(",")]
        # An empty value is a value (and an invalid one), never the same as leaving it out.
        usage = await service.usage(
            key,
            start=_instant(params.get("from"), "from"),
            end=_instant(params.get("to"), "to"),
            metric=params.get("metric"),
            group_by=group_by,
            filters=filters,
            granularity=params.get("granularity", "hour"),
            customer=params.get("customer"),
        )
    except MeterlineError as exc:
        return error_response(exc)
    return Response(encoder.encode(usage), 200, media_type=JSON)


def _instant(value: str | None, name: str) -> Any:
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise InvalidInput(f"{name}: {exc}") from None


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    service = _service(request)
    database = await request.app.state.queries.ping()
    broker = await service.publisher.ready()
    body = {
        "database": "ok" if database else "unreachable",
        "broker": "ok" if broker else "unreachable",
    }
    if not (database and broker):
        log_event(logger, "not_ready", logging.WARNING, **body)
    return JSONResponse(body, 200 if database and broker else 503)


async def metrics_endpoint(request: Request) -> Response:
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)


_OPENAPI = encoder.encode(openapi_document())


async def openapi(request: Request) -> Response:
    return Response(_OPENAPI, media_type=JSON)


routes = [
    Route("/v1/events", post_events, methods=["POST"]),
    Route("/v1/usage", get_usage, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics_endpoint, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    *dropins.routes,
]
