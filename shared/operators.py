"""Operators: who may use the console and the admin API, as an admin (changes) or a viewer (reads).

Operator tokens are minted like API keys (shared.keys): shown once, stored as HMAC-SHA-256 with the
server's pepper beside a public prefix. A browser that logged in with a token holds a session
token instead (a cookie), stored the same way; the CSRF token of a session is derived from it.
Revoking an operator ends its sessions at once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.errors import Conflict, InvalidInput, NotFound
from shared.keys import generate_operator_token, hash_key, hashes_match, parse_operator_prefix
from shared.models import Operator, OperatorRole, OperatorSession

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,99}$")
#: Last-used times are written at most this often per operator, so reads stay reads.
_TOUCH_EVERY = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class OperatorIdentity:
    """Who a request acts as once its token or session is verified."""

    id: uuid.UUID
    name: str
    role: OperatorRole

    @property
    def can_change(self) -> bool:
        return self.role == OperatorRole.ADMIN


@dataclass(frozen=True, slots=True)
class CreatedOperator:
    operator: Operator
    plaintext: str  # shown once; never stored, never logged


@dataclass(frozen=True, slots=True)
class StartedSession:
    token: str  # the cookie's value; only its hash is stored
    csrf_token: str
    expires_at: datetime


def parse_role(value: str) -> OperatorRole:
    try:
        return OperatorRole(value.strip().lower())
    except ValueError:
        raise InvalidInput(f"unknown operator role {value!r}: use admin or viewer") from None


def create_operator(
    session: Session, *, name: str, role: OperatorRole, pepper: bytes
) -> CreatedOperator:
    name = name.strip()
    if not _NAME.match(name):
        raise InvalidInput(
            f"operator name {name!r} must be 1-100 letters, digits, spaces or '._@-', "
            "starting with a letter or digit"
        )
    if session.scalar(sa.select(Operator.id).where(Operator.name == name)) is not None:
        raise Conflict(f"an operator named {name!r} already exists")
    new = generate_operator_token()
    operator = Operator(
        name=name, role=role, prefix=new.prefix, token_hash=hash_key(new.plaintext, pepper)
    )
    session.add(operator)
    session.flush()
    return CreatedOperator(operator=operator, plaintext=new.plaintext)


def list_operators(session: Session) -> list[Operator]:
    return list(session.scalars(sa.select(Operator).order_by(Operator.name)))


def find_operator(session: Session, reference: str) -> Operator:
    """An operator by id, token prefix or name."""
    operator = None
    try:
        operator = session.get(Operator, uuid.UUID(reference))
    except ValueError:
        operator = session.scalar(
            sa.select(Operator).where(
                sa.or_(Operator.prefix == reference, Operator.name == reference)
            )
        )
    if operator is None:
        raise NotFound(f"operator {reference!r} not found")
    return operator


def revoke_operator(session: Session, operator_id: uuid.UUID, *, now: datetime) -> Operator:
    """Revoke the token and end every browser session of the operator."""
    operator = session.get(Operator, operator_id)
    if operator is None:
        raise NotFound(f"operator {operator_id} not found")
    if operator.revoked_at is None:
        operator.revoked_at = now
    session.execute(sa.delete(OperatorSession).where(OperatorSession.operator_id == operator_id))
    session.flush()
    return operator


def _identity(operator: Operator) -> OperatorIdentity:
    return OperatorIdentity(id=operator.id, name=operator.name, role=operator.role)


def verify_operator_token(
    session: Session, plaintext: str, *, pepper: bytes, now: datetime
) -> OperatorIdentity | None:
    """The operator of a well-formed, known, unrevoked token; else None."""
    if parse_operator_prefix(plaintext) is None:
        return None
    presented = hash_key(plaintext, pepper)
    operator = session.scalar(sa.select(Operator).where(Operator.token_hash == presented))
    if operator is None or not hashes_match(operator.token_hash, presented):
        return None
    if operator.revoked_at is not None:
        return None
    if operator.last_used_at is None or operator.last_used_at < now - _TOUCH_EVERY:
        operator.last_used_at = now
    return _identity(operator)


def _session_hash(token: str, pepper: bytes) -> bytes:
    return hmac.new(pepper, b"operator-session:" + token.encode(), hashlib.sha256).digest()


def csrf_token_for(session_token: str, pepper: bytes) -> str:
    """The CSRF token of a session: derived from it, so nothing more is stored or can drift."""
    return hmac.new(pepper, b"csrf:" + session_token.encode(), hashlib.sha256).hexdigest()


def csrf_token_matches(session_token: str, presented: str | None, pepper: bytes) -> bool:
    if not presented:
        return False
    return hmac.compare_digest(csrf_token_for(session_token, pepper), presented)


def start_session(
    session: Session,
    operator: OperatorIdentity,
    *,
    pepper: bytes,
    now: datetime,
    lifetime: timedelta,
) -> StartedSession:
    token = secrets.token_urlsafe(32)
    expires_at = now + lifetime
    session.add(
        OperatorSession(
            operator_id=operator.id,
            token_hash=_session_hash(token, pepper),
            expires_at=expires_at,
        )
    )
    # Expired sessions of anyone go with each login: the table stays the size of who is logged in.
    session.execute(sa.delete(OperatorSession).where(OperatorSession.expires_at <= now))
    session.flush()
    return StartedSession(token, csrf_token_for(token, pepper), expires_at)


def resolve_session(
    session: Session, token: str, *, pepper: bytes, now: datetime
) -> OperatorIdentity | None:
    """The operator of a live session of an unrevoked operator; else None."""
    operator = session.scalar(
        sa.select(Operator)
        .join(OperatorSession, OperatorSession.operator_id == Operator.id)
        .where(
            OperatorSession.token_hash == _session_hash(token, pepper),
            OperatorSession.expires_at > now,
            Operator.revoked_at.is_(None),
        )
    )
    return _identity(operator) if operator is not None else None


def end_session(session: Session, token: str, *, pepper: bytes) -> None:
    session.execute(
        sa.delete(OperatorSession).where(OperatorSession.token_hash == _session_hash(token, pepper))
    )
