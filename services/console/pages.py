"""Rendering the web console's pages: one Jinja2 environment (autoescaped), the layout's shared
context (the operator, the CSRF token, a one-time notice) and the security headers of every page."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from services.billing.invoice_html import money
from services.console.auth import Principal
from services.console.routing import NOTICE_COOKIE, Render

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"

#: No inline script or style anywhere: the pages need nothing but their own files.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _when(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        return (
            value.strftime("%Y-%m-%d %H:%M:%S UTC") if value.utcoffset() is not None else str(value)
        )
    return str(value)


def _number(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, Decimal):
        text = f"{value.normalize():f}"
        whole, _, fraction = text.partition(".")
        return (
            f"{int(whole):,}" + (f".{fraction}" if fraction else "")
            if whole.lstrip("-").isdigit()
            else text
        )
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _money(minor: object, currency: str = "") -> str:
    if not isinstance(minor, int):
        return "—"
    if currency:
        return money(minor, currency)
    sign = "-" if minor < 0 else ""
    whole, cents = divmod(abs(minor), 100)
    return f"{sign}{whole:,}.{cents:02d} {currency.upper()}".strip()


def _query(request: Request, **changes: object) -> str:
    params = dict(request.query_params)
    params.update({k: str(v) for k, v in changes.items() if v is not None})
    return "?" + urlencode(params)


class PageRenderer:
    def __init__(self) -> None:
        self.env = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(when=_when, number=_number, money=_money)

    def __call__(self, request: Request, principal: Principal | None, result: Render) -> Response:
        notice = request.cookies.get(NOTICE_COOKIE)
        context: dict[str, Any] = {
            "request": request,
            "operator": principal.operator if principal else None,
            "csrf_token": principal.csrf_token if principal else None,
            "notice": unquote(notice) if notice else None,
            "query": lambda **changes: _query(request, **changes),
            "path": request.url.path,
            **result.context,
        }
        text = self.env.get_template(result.template).render(context)
        return HTMLResponse(
            text, result.status, headers={**SECURITY_HEADERS, **(result.headers or {})}
        )
