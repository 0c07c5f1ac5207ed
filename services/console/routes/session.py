"""Logging in and out of the console, who am I, and the overview page.

Login trades an operator token for a session cookie (Secure, HttpOnly, SameSite=Strict, host-only
via the __Host- prefix). The login form itself is CSRF-protected by a double-submit cookie, so a
page of another site cannot log a browser in as someone else.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from services.billing.history import list_billing_runs
from services.billing.mismatches import list_mismatches
from services.console.auth import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    CsrfRefused,
    authenticate,
    check_same_origin,
)
from services.console.routing import Call, Console, Operation, Page, Render, read_form
from services.console.schemas import audit_document, billing_run_document, operator_document
from shared.audit import list_audit
from shared.db import unit_of_work
from shared.errors import MeterlineError, Unauthenticated
from shared.models import Organization
from shared.operators import csrf_token_matches, end_session, start_session, verify_operator_token

operations = [
    Operation(
        "GET",
        "/me",
        "whoAmI",
        "The operator this request acts as",
        "session",
        lambda call: operator_document(call.principal.operator),
        {"$ref": "#/components/schemas/Operator"},
    ),
]


def _overview(call: Call) -> Render:
    organizations = call.session.scalar(sa.select(sa.func.count()).select_from(Organization))
    runs = list_billing_runs(call.session, limit=1)
    return Render(
        "overview.html",
        {
            "organizations": organizations or 0,
            "open_mismatches": list_mismatches(call.session, state="open", limit=1).total,
            "last_run": billing_run_document(runs.runs[0]) if runs.runs else None,
            "recent": [audit_document(e) for e in list_audit(call.session, limit=8).entries],
        },
    )


pages = [Page("GET", "/", _overview)]


def _safe_next(target: str | None) -> str:
    """Only a path of this site: never `//host` or a scheme, which would leave it."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _cookie(response: Response, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path="/", secure=True, httponly=True, samesite="strict"
    )


def login_routes(console: Console) -> list[Route]:
    lifetime = timedelta(hours=console.settings.console_session_hours)

    def _form(request: Request, *, error: str | None = None, status: int = 200) -> Response:
        token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
        response = console.render_page(
            request,
            None,
            Render(
                "login.html",
                {
                    "login_csrf": token,
                    "next": _safe_next(request.query_params.get("next")),
                    "error": error,
                },
                status,
            ),
        )
        _cookie(response, LOGIN_COOKIE, token, 3600)
        return response

    async def login_form(request: Request) -> Response:
        return _form(request)

    async def login(request: Request) -> Response:
        try:
            form = await read_form(request)
        except MeterlineError as exc:
            return _form(request, error=exc.message, status=exc.status)
        presented = str(form.get("login_csrf") or "")
        expected = request.cookies.get(LOGIN_COOKIE) or ""
        try:
            check_same_origin(request)
            if not expected or not hmac.compare_digest(presented, expected):
                raise CsrfRefused("the login form expired: load it again")
        except CsrfRefused as exc:
            return _form(request, error=exc.message, status=403)
        token = str(form.get("token") or "").strip()

        def work() -> str | None:
            now = datetime.now(UTC)
            with unit_of_work(console.engine) as session:
                operator = verify_operator_token(session, token, pepper=console.pepper, now=now)
                if operator is None:
                    return None
                return start_session(
                    session, operator, pepper=console.pepper, now=now, lifetime=lifetime
                ).token

        session_token = await run_in_threadpool(work)
        if session_token is None:
            return _form(request, error="Unknown or revoked operator token.", status=401)
        response = RedirectResponse(_safe_next(str(form.get("next") or "/")), 303)
        _cookie(response, SESSION_COOKIE, session_token, int(lifetime.total_seconds()))
        response.delete_cookie(
            LOGIN_COOKIE, path="/", secure=True, httponly=True, samesite="strict"
        )
        return response

    async def logout(request: Request) -> Response:
        cookie = request.cookies.get(SESSION_COOKIE)

        def work() -> None:
            now = datetime.now(UTC)
            with unit_of_work(console.engine) as session:
                principal = authenticate(session, request, pepper=console.pepper, now=now)
                check_same_origin(request)
                if principal.session_token is None or not csrf_token_matches(
                    principal.session_token, str(form.get("csrf_token") or ""), console.pepper
                ):
                    raise CsrfRefused("missing or wrong CSRF token")
                end_session(session, principal.session_token, pepper=console.pepper)

        try:
            form = await read_form(request)
            if cookie:
                await run_in_threadpool(work)
        except Unauthenticated:
            pass
        except MeterlineError as exc:
            return console.render_page(
                request, None, Render("error.html", {"error": exc}, exc.status)
            )
        response = RedirectResponse("/login", 303)
        response.delete_cookie(
            SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict"
        )
        return response

    return [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]
