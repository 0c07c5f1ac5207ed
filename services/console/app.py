"""Wiring of the console: settings, the database engine, the route modules (each adds its API
operations and its pages), the OpenAPI document, static files and the pipeline sampler.

A new part of the console is one more module in ROUTE_MODULES
with `operations` and `pages`, and its templates.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from types import ModuleType

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.console.openapi import openapi_document
from services.console.pages import SECURITY_HEADERS, STATIC, PageRenderer
from services.console.pipeline import Sampler
from services.console.routes import (
    audit,
    billing,
    dead_letters,
    invoices,
    meters,
    organizations,
    pipeline,
    plans,
    replay_runs,
    session,
    subscriptions,
    usage,
)
from services.console.routing import (
    API_PREFIX,
    Console,
    Operation,
    Render,
    api_route,
    error_response,
    json_response,
    page_route,
)
from shared.db import create_sync_engine
from shared.errors import MeterlineError, NotFound
from shared.logs import configure_logging, log_event, register_secret
from shared.settings import Settings, get_settings

logger = logging.getLogger("meterline.console")

ROUTE_MODULES: tuple[ModuleType, ...] = (
    session,
    organizations,
    plans,
    meters,
    subscriptions,
    invoices,
    usage,
    billing,
    dead_letters,
    replay_runs,
    pipeline,
    audit,
)


def operations() -> list[Operation]:
    return [op for module in ROUTE_MODULES for op in module.operations]


def create_app(
    settings: Settings | None = None, *, sample: bool = True, configure_logs: bool = True
) -> Starlette:
    settings = settings or get_settings()
    register_secret(settings.pepper_bytes().decode())
    if configure_logs:
        configure_logging(settings.log_level, settings.log_format)
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    engine = create_sync_engine(settings, pool_size=5, max_overflow=5, pool_timeout=10)
    renderer = PageRenderer()
    console = Console(settings, engine, renderer)
    document = openapi_document(operations())

    async def openapi(request: Request) -> Response:
        return json_response(document)

    async def api_not_found(request: Request) -> Response:
        return error_response(NotFound(f"no admin API route {request.url.path}"))

    routes: list[Route | Mount] = [
        Route(f"{API_PREFIX}/openapi.json", openapi, methods=["GET"]),
        *[api_route(console, op) for op in operations()],
        Route(
            API_PREFIX + "/{rest:path}",
            api_not_found,
            methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        ),
        *session.login_routes(console),
        *[page_route(console, page) for module in ROUTE_MODULES for page in module.pages],
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sampler = Sampler(settings, settings.console_sample_seconds) if sample else None
        if sampler is not None:
            sampler.start()
        log_event(logger, "console_started")
        try:
            yield
        finally:
            if sampler is not None:
                sampler.stop()
            console.live.close()
            engine.dispose()
            log_event(logger, "console_stopped")

    async def unexpected(request: Request, exc: Exception) -> Response:
        log_event(
            logger, "request_failed", logging.ERROR, path=request.url.path, error=repr(exc)[:300]
        )
        failure = MeterlineError("internal error")
        if request.url.path.startswith(API_PREFIX):
            return error_response(failure)
        return renderer(request, None, Render("error.html", {"error": failure}, 500))

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        failure = MeterlineError(getattr(exc, "detail", "not found"))
        failure.status = status
        failure.code = "not_found" if status == 404 else "method_not_allowed"
        if request.url.path.startswith(API_PREFIX):
            return error_response(failure)
        return renderer(request, None, Render("error.html", {"error": failure}, status))

    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={Exception: unexpected, 404: not_found, 405: not_found},
        middleware=[Middleware(SecurityHeaders)],
    )


class SecurityHeaders:
    """Adds the pages' security headers (CSP, no framing, no caching) to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.headers = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (name, value) for name, value in self.headers if name not in present
                ]
            await send(message)

        await self.app(scope, receive, with_headers)
