"""HTTP adaptation of the drop-ins: OpenMeter's ingest under /openmeter, Lago's under /lago.

Each reads its wire shape, translates it (openmeter.py, lago.py) into Meterline events and hands
them to IngestService.ingest, the path /v1/events takes: the same key check (done before routing,
api.authenticate_first), validation, all or nothing, envelope, topic and ledger. Every event of
these shapes names its customer; answers and errors are in each API's own documents.
"""

from __future__ import annotations

import http
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from services.ingest.customers import Directory
from services.ingest.dropins import lago, openmeter
from services.ingest.dropins.payloads import event_encoder, renamed
from services.ingest.dropins.values import ValuePaths
from services.ingest.service import IngestService
from shared.apikeys import VerifiedKey
from shared.errors import MeterlineError, UnsupportedMediaType
from shared.events import MAX_BODY_BYTES
from shared.http_body import read_body
from shared.logs import redact

OPENMETER_EVENTS = "/openmeter/api/v1/events"
LAGO_EVENTS = "/lago/api/v1/events"
LAGO_BATCH = "/lago/api/v1/events/batch"
PATHS = frozenset({OPENMETER_EVENTS, LAGO_EVENTS, LAGO_BATCH})
PROBLEM = "application/problem+json"
JSON = "application/json"

ErrorParts = tuple[int, dict[str, str], bytes, str]


def _context(request: Request) -> tuple[IngestService, VerifiedKey, ValuePaths]:
    state = request.app.state
    key: VerifiedKey = request.scope["meterline.key"]
    return state.service, key, state.value_paths


def _media_type(request: Request) -> str:
    return (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()


def _retry_after(exc: MeterlineError) -> dict[str, str]:
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        return {"Retry-After": str(max(1, int(retry_after + 0.999)))}
    if exc.status == 503:
        return {"Retry-After": "2"}
    return {}


def openmeter_error(exc: MeterlineError) -> ErrorParts:
    """An RFC 7807 problem, as OpenMeter answers; its invalid events are 400, not 422."""
    status = 400 if exc.status == 422 else exc.status
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": http.HTTPStatus(status).phrase,
        "status": status,
        "detail": exc.message,
        "code": exc.code,
    }
    if exc.details is not None:
        body["errors"] = exc.details
    headers = _retry_after(exc)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return status, headers, _encoded(body), PROBLEM


def lago_error(exc: MeterlineError) -> ErrorParts:
    """Lago's error document: {"status", "error", "code", "error_details"}."""
    body: dict[str, Any] = {
        "status": exc.status,
        "error": http.HTTPStatus(exc.status).phrase,
        "code": exc.code,
        "message": exc.message,
    }
    if isinstance(exc.details, list):
        # Lago keys a batch's problems by the event's position.
        details: dict[str, Any] = {}
        for position, detail in enumerate(exc.details):
            if isinstance(detail, dict):
                details[str(detail["index"])] = detail["reason"]
            else:
                details[str(position)] = detail
        body["error_details"] = details
    return exc.status, _retry_after(exc), _encoded(body), JSON


def _encoded(document: dict[str, Any]) -> bytes:
    # As on /v1: a key pasted into a field by mistake is never sent back.
    return redact(event_encoder.encode(document).decode()).encode()


def error_renderer(path: str) -> Callable[[MeterlineError], ErrorParts] | None:
    """How errors on `path` are answered, when it is a drop-in's."""
    if path.startswith("/openmeter/"):
        return openmeter_error
    if path.startswith("/lago/"):
        return lago_error
    return None


async def _fresh_meters(service: IngestService) -> None:
    """Re-read the meters if they are older than their TTL, so value paths are current."""
    if service.meters is not None:
        await service.meters.get()


def _respond(parts: ErrorParts) -> Response:
    status, headers, body, media_type = parts
    return Response(body, status, headers, media_type)


async def post_openmeter_events(request: Request) -> Response:
    service, key, value_paths = _context(request)
    media_type = _media_type(request)
    try:
        if media_type not in (openmeter.SINGLE, openmeter.BATCH, JSON):
            raise UnsupportedMediaType(
                f"send CloudEvents as {openmeter.SINGLE} or {openmeter.BATCH}"
            )
        items = openmeter.cloudevents(await read_body(request, MAX_BODY_BYTES), media_type)
        await _fresh_meters(service)
        events = openmeter.translate(items, value_paths)
        await _ingest(service, key, events, service.customers, openmeter.FIELD_NAMES)
    except ClientDisconnect:
        return Response(status_code=499)
    except MeterlineError as exc:
        return _respond(openmeter_error(exc))
    return Response(status_code=204)


async def post_lago_event(request: Request) -> Response:
    return await _post_lago(request, batch=False)


async def post_lago_batch(request: Request) -> Response:
    return await _post_lago(request, batch=True)


async def _post_lago(request: Request, *, batch: bool) -> Response:
    service, key, value_paths = _context(request)
    received_at = datetime.now(UTC)
    try:
        if _media_type(request) != JSON:
            raise UnsupportedMediaType("send Lago events as application/json")
        items = lago.lago_events(await read_body(request, MAX_BODY_BYTES), batch=batch)
        await _fresh_meters(service)
        events = lago.translate(items, value_paths)
        await _ingest(service, key, events, service.subscriptions, lago.FIELD_NAMES)
    except ClientDisconnect:
        return Response(status_code=499)
    except MeterlineError as exc:
        return _respond(lago_error(exc))
    documents = [lago.event_document(item, received_at) for item in items]
    body = {"events": documents} if batch else {"event": documents[0]}
    return Response(event_encoder.encode(body), 200, media_type=JSON)


async def _ingest(
    service: IngestService,
    key: VerifiedKey,
    events: list[dict[str, Any]],
    directory: Directory,
    names: dict[str, str],
) -> None:
    try:
        await service.ingest(
            key,
            event_encoder.encode({"events": events}),
            directory=directory,
            always_named=True,
        )
    except MeterlineError as exc:
        raise renamed(exc, names) from None


routes = [
    Route(OPENMETER_EVENTS, post_openmeter_events, methods=["POST"]),
    Route(LAGO_EVENTS, post_lago_event, methods=["POST"]),
    Route(LAGO_BATCH, post_lago_batch, methods=["POST"]),
]
