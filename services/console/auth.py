"""Who is asking, and may they: operator tokens (API clients, `Authorization: Bearer`) and browser
sessions (a cookie), with CSRF protection on every change made through a session.

A change needs an admin operator. Through a session it also needs the session's CSRF token (form
field `csrf_token` or header `X-CSRF-Token`) and, when the browser says where the request came
from, this origin: a page of another site can neither read the token nor pass the origin check.
A bearer token is never sent by a browser on its own, so it needs no CSRF token.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session
from starlette.requests import Request

from shared.audit import Actor
from shared.errors import Forbidden, Unauthenticated
from shared.operators import (
    OperatorIdentity,
    csrf_token_matches,
    resolve_session,
    verify_operator_token,
)

SESSION_COOKIE = "__Host-meterline_session"
LOGIN_COOKIE = "__Host-meterline_login"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class CsrfRefused(Forbidden):
    code = "csrf_refused"


@dataclass(frozen=True, slots=True)
class Principal:
    operator: OperatorIdentity
    session_token: str | None  # set when the request came with the session cookie
    csrf_token: str | None

    @property
    def actor(self) -> Actor:
        return Actor(self.operator.name, self.operator.id)


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("send `Authorization: Bearer <operator token>`")
    return token.strip()


def authenticate(session: Session, request: Request, *, pepper: bytes, now: datetime) -> Principal:
    """The operator of the bearer token, else of the session cookie; Unauthenticated if neither
    names a live operator (one message for every reason)."""
    from shared.operators import csrf_token_for

    token = bearer_token(request)
    if token is not None:
        operator = verify_operator_token(session, token, pepper=pepper, now=now)
        if operator is None:
            raise Unauthenticated("unknown or revoked operator token")
        return Principal(operator, None, None)
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        operator = resolve_session(session, cookie, pepper=pepper, now=now)
        if operator is not None:
            return Principal(operator, cookie, csrf_token_for(cookie, pepper))
    raise Unauthenticated("log in with an operator token")


def require_change(
    principal: Principal, request: Request, *, pepper: bytes, form_token: str | None = None
) -> None:
    """Forbidden unless the operator may change things and, through a session, the request
    carries the session's CSRF token and comes from this origin."""
    if not principal.operator.can_change:
        raise Forbidden(f"operator {principal.operator.name} is a viewer: reads only")
    if principal.session_token is None:
        return
    check_same_origin(request)
    presented = request.headers.get(CSRF_HEADER) or form_token
    if not csrf_token_matches(principal.session_token, presented, pepper):
        raise CsrfRefused("missing or wrong CSRF token: reload the page and try again")


def check_same_origin(request: Request) -> None:
    """CsrfRefused when the browser says the request came from another site."""
    if request.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        raise CsrfRefused("cross-site request refused")
    origin = request.headers.get("origin")
    if origin is not None and origin != own_origin(request):
        raise CsrfRefused("request from another origin refused")


def own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"
