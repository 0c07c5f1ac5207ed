"""How a route module declares what it serves, and the one place requests become calls.

An API `Operation` (method, path, parameters, body and response schemas, and a handler that
returns a document) is both a Starlette route and its OpenAPI entry, so the document cannot drift
from the routes. A `Page` is a server-rendered page or form post. Both run their handler in a
thread, inside one unit of work (the database transaction of the request) after the operator is
authenticated; a change also passes auth.require_change, and is audited in that transaction.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import parse_qsl, quote

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from services.console.auth import SAFE_METHODS, Principal, authenticate, require_change
from services.console.live import LiveReaders
from shared.db import unit_of_work
from shared.errors import InvalidInput, MeterlineError, PayloadTooLarge, Unauthenticated
from shared.events import parse_timestamp
from shared.logs import redact
from shared.settings import Settings

API_PREFIX = "/admin/v1"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
MAX_BODY_BYTES = 1024 * 1024
ParamType = Literal["string", "integer", "boolean", "date-time", "object"]
_KEYED = re.compile(r"^([a-z_]+)\[([^\]]*)\]$")


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    description: str
    type: ParamType = "string"
    location: Literal["query", "path"] = "query"
    required: bool = False
    enum: tuple[str, ...] | None = None
    minimum: int | None = None
    maximum: int | None = None
    default: object = None

    def schema(self) -> dict[str, Any]:
        if self.type == "date-time":
            found: dict[str, Any] = {"type": "string", "format": "date-time"}
        elif self.type == "object":
            # `name[<key>]=value`, as OpenAPI's deepObject style spells it.
            found = {"type": "object", "additionalProperties": {"type": "string"}}
        else:
            found = {"type": self.type}
        if self.enum:
            found["enum"] = list(self.enum)
        if self.minimum is not None:
            found["minimum"] = self.minimum
        if self.maximum is not None:
            found["maximum"] = self.maximum
        if self.default is not None:
            found["default"] = self.default
        return found

    def parse(self, raw: str) -> object:
        if self.enum and raw not in self.enum:
            raise InvalidInput(f"{self.name}: must be one of {', '.join(self.enum)}")
        if self.type == "integer":
            if not raw.isdigit() or len(raw) > 12:
                raise InvalidInput(f"{self.name}: must be a whole number")
            value = int(raw)
            if (self.minimum is not None and value < self.minimum) or (
                self.maximum is not None and value > self.maximum
            ):
                raise InvalidInput(
                    f"{self.name}: must be between {self.minimum} and {self.maximum}"
                )
            return value
        if self.type == "boolean":
            if raw not in ("true", "false"):
                raise InvalidInput(f"{self.name}: must be true or false")
            return raw == "true"
        if self.type == "date-time":
            if _DATE.match(raw):
                # A date alone (what a browser's date field sends) is that day's start in UTC.
                try:
                    return datetime.fromisoformat(raw).replace(tzinfo=UTC)
                except ValueError:
                    raise InvalidInput(f"{self.name}: {raw!r} is not a date") from None
            try:
                return parse_timestamp(raw)
            except ValueError as exc:
                raise InvalidInput(f"{self.name}: {exc}") from None
        if "\x00" in raw or len(raw) > 500:
            raise InvalidInput(f"{self.name}: at most 500 characters, and no NUL character")
        return raw


PAGING = (
    Param("limit", "How many to return.", "integer", minimum=1, maximum=200, default=50),
    Param("offset", "How many to skip.", "integer", minimum=0, maximum=10**9, default=0),
)


@dataclass
class Call:
    """One authenticated request, as a handler sees it."""

    request: Request
    session: Session
    principal: Principal
    settings: Settings
    now: datetime
    args: dict[str, object]
    path: dict[str, str]
    live: LiveReaders  # the console's long-lived HTTP client and dead-letter reader
    body: Any = None
    form: Mapping[str, str] = field(default_factory=dict)

    def arg(self, name: str) -> Any:
        return self.args.get(name)


Handler = Callable[[Call], Any]


@dataclass(frozen=True, slots=True)
class Operation:
    """One admin API route and its OpenAPI entry."""

    method: str
    path: str  # below API_PREFIX, e.g. "/organizations/{organization}"
    name: str  # operationId
    summary: str
    tag: str
    handler: Handler
    response: dict[str, Any]
    params: tuple[Param, ...] = ()
    body: dict[str, Any] | None = None
    change: bool = False
    description: str = ""


@dataclass(frozen=True, slots=True)
class Render:
    template: str
    context: dict[str, Any]
    status: int = 200
    headers: Mapping[str, str] | None = None  # over the pages' security headers


@dataclass(frozen=True, slots=True)
class Redirect:
    location: str
    notice: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """One web console page (GET) or form post (POST, a change)."""

    method: str
    path: str
    handler: Callable[[Call], Render | Redirect]
    params: tuple[Param, ...] = ()


class Console:
    """What every request needs: settings, the engine, the pepper, the page renderer and the
    long-lived readers of the pipeline."""

    def __init__(self, settings: Settings, engine: Engine, render: Any) -> None:
        self.settings = settings
        self.engine = engine
        self.pepper = settings.pepper_bytes()
        self.render_page = render
        self.live = LiveReaders(settings)


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, frozenset | set | tuple):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def json_response(
    document: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    body = json.dumps(document, default=_json_default, separators=(",", ":"))
    return Response(body, status, headers, "application/json")


def error_response(exc: MeterlineError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    # An error may quote what was sent; a token pasted there by mistake is not sent back.
    return Response(
        redact(json.dumps(exc.to_dict(), default=_json_default)),
        exc.status,
        headers,
        "application/json",
    )


def _parse_args(
    request: Request, params: Sequence[Param], *, strict: bool
) -> tuple[dict[str, object], dict[str, str]]:
    query = request.query_params
    declared = {p.name for p in params if p.location == "query"}
    keyed = {p.name for p in params if p.type == "object"}
    if strict:
        unknown = sorted(
            name
            for name in set(query) - declared
            if not ((found := _KEYED.match(name)) and found.group(1) in keyed)
        )
        if unknown:
            raise InvalidInput(f"unknown query parameter(s): {', '.join(unknown)}")
    args: dict[str, object] = {}
    for param in params:
        if param.location != "query":
            continue
        if param.type == "object":
            args[param.name] = _keyed_values(query, param, strict=strict)
            continue
        values = query.getlist(param.name)
        if len(values) > 1:
            raise InvalidInput(f"{param.name}: given more than once")
        if not values or (values[0] == "" and not strict):
            if param.required:
                raise InvalidInput(f"{param.name}: is required")
            args[param.name] = param.default
            continue
        args[param.name] = param.parse(values[0])
    path = {k: str(v) for k, v in request.path_params.items()}
    for value in path.values():
        if "\x00" in value or len(value) > 200:
            raise InvalidInput("path: at most 200 characters, and no NUL character")
    return args, path


def _keyed_values(query: QueryParams, param: Param, *, strict: bool) -> dict[str, str]:
    """The `name[key]=value` pairs of a deepObject parameter, each key once (a page's form
    leaves out an empty value)."""
    if param.name in query and (strict or query[param.name]):
        raise InvalidInput(f"{param.name}: give it as {param.name}[<name>]=value")
    found: dict[str, str] = {}
    for name in sorted(set(query)):
        matched = _KEYED.match(name)
        if not matched or matched.group(1) != param.name:
            continue
        values = query.getlist(name)
        if len(values) > 1:
            raise InvalidInput(f"{name}: given more than once")
        key, value = matched.group(2), values[0]
        if not strict and value == "":
            continue
        if not key or "\x00" in key + value or len(key) > 200 or len(value) > 500:
            raise InvalidInput(
                f"{name}: a name of 1 to 200 characters and a value of at most 500, without NUL"
            )
        found[key] = value
    return found


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"body is larger than {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _run(
    console: Console,
    request: Request,
    handler: Callable[[Call], Any],
    *,
    change: bool,
    args: dict[str, object],
    path: dict[str, str],
    body: Any = None,
    form: Mapping[str, str] | None = None,
) -> tuple[Principal, Any]:
    now = datetime.now(UTC)
    with unit_of_work(console.engine) as session:
        principal = authenticate(session, request, pepper=console.pepper, now=now)
        if change:
            require_change(
                principal,
                request,
                pepper=console.pepper,
                form_token=(form or {}).get("csrf_token"),
            )
        call = Call(
            request, session, principal, console.settings, now, args, path, console.live, body,
            form or {},
        )  # fmt: skip
        return principal, handler(call)


def api_route(console: Console, operation: Operation) -> Route:
    async def endpoint(request: Request) -> Response:
        try:
            args, path = _parse_args(request, operation.params, strict=True)
            body = None
            if operation.body is not None:
                raw = await _read_body(request)
                media = (request.headers.get("content-type") or "").split(";")[0].strip()
                if media != "application/json":
                    raise InvalidInput("send the body as application/json")
                try:
                    body = json.loads(raw or b"null")
                except ValueError as exc:
                    raise InvalidInput(f"body: not valid JSON: {exc}") from None
                if not isinstance(body, dict):
                    raise InvalidInput("body: must be a JSON object")
            _, document = await run_in_threadpool(
                _run,
                console,
                request,
                operation.handler,
                change=operation.change,
                args=args,
                path=path,
                body=body,
            )
        except MeterlineError as exc:
            return error_response(exc)
        return json_response(document)

    return Route(
        API_PREFIX + operation.path,
        endpoint,
        methods=[operation.method],
        name=operation.name,
    )


NOTICE_COOKIE = "__Host-meterline_notice"


def page_route(console: Console, page: Page) -> Route:
    change = page.method not in SAFE_METHODS

    async def endpoint(request: Request) -> Response:
        form: dict[str, str] = {}
        try:
            args, path = _parse_args(request, page.params, strict=False)
            if change:
                form = await read_form(request)
            principal, result = await run_in_threadpool(
                _run, console, request, page.handler, change=change, args=args, path=path,
                form=form,
            )  # fmt: skip
        except Unauthenticated:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target)}", 303)
        except MeterlineError as exc:
            return console.render_page(
                request, None, Render("error.html", {"error": exc}, exc.status)
            )
        if isinstance(result, Redirect):
            response = RedirectResponse(result.location, 303)
            if result.notice:
                response.set_cookie(
                    NOTICE_COOKIE, quote(result.notice[:300]), max_age=60, path="/",
                    secure=True, httponly=True, samesite="strict",
                )  # fmt: skip
            return response
        response = console.render_page(request, principal, result)
        if request.cookies.get(NOTICE_COOKIE):
            response.delete_cookie(
                NOTICE_COOKIE, path="/", secure=True, httponly=True, samesite="strict"
            )
        return response

    return Route(page.path, endpoint, methods=[page.method])


async def read_form(request: Request) -> dict[str, str]:
    """The fields of a form post (urlencoded: the console's forms upload no files); the first
    value of a repeated field."""
    media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    raw = await _read_body(request)
    if media != "application/x-www-form-urlencoded":
        return {}
    try:
        pairs = parse_qsl(raw.decode(), keep_blank_values=True, max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput("the form could not be read") from None
    fields: dict[str, str] = {}
    for name, value in pairs:
        fields.setdefault(name, value)
    return fields


def html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status)
