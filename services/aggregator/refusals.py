"""Telling a database that is down (retry the whole batch) from one that refuses some events
(isolate them), and the bisection that finds those events, for the live batch and for replay.

A write refused for its content is split in halves, each written on its own, down to the refused
items alone: one bad event never takes the rest of its request, or of its batch, with it. k
refused items among n cost about 2k log2(n) extra writes; none cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sqlalchemy import exc as sa_exc

T = TypeVar("T")
R = TypeVar("R")


class LedgerChangedUnderBatch(Exception):
    """The ledger gained rows this batch's lookup did not see; the batch is rolled back."""


def is_transient(exc: BaseException) -> bool:
    """A failure of the database itself (down, restarting, deadlock): retry the whole batch."""
    if isinstance(exc, LedgerChangedUnderBatch):
        return True
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | ConnectionError)


def is_refusal(exc: BaseException) -> bool:
    """The database (or its driver, which cannot encode a lone surrogate and says so with a bare
    UnicodeEncodeError) refused what was written, and would refuse it again."""
    return isinstance(exc, sa_exc.DBAPIError | UnicodeError) and not is_transient(exc)


def refusal_reason(exc: BaseException) -> str:
    """The first line of what the database said, without the statement and its parameters."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


@dataclass(slots=True)
class Isolated(Generic[T, R]):
    """What the written parts returned, in order, and each refused item with the reason."""

    written: list[R] = field(default_factory=list)
    refused: list[tuple[T, str]] = field(default_factory=list)


def write_isolating(
    items: Sequence[T],
    write: Callable[[Sequence[T]], R],
    *,
    on_first_refusal: Callable[[BaseException], None] | None = None,
) -> Isolated[T, R]:
    """`write(items)`, or, if the database refuses it, `write` of each half, recursively.

    `write` must leave nothing behind when it raises (its own transaction or savepoint). The
    halves are written in order, so a rule like "the first accepted version wins" still sees the
    items in their original order. Transient errors propagate: the caller retries it all."""
    outcome: Isolated[T, R] = Isolated()

    def attempt(part: Sequence[T], first: bool) -> None:
        try:
            outcome.written.append(write(part))
        except Exception as exc:
            if not is_refusal(exc):
                raise
            if first and on_first_refusal is not None:
                on_first_refusal(exc)
            if len(part) == 1:
                outcome.refused.append((part[0], refusal_reason(exc)))
                return
            half = len(part) // 2
            attempt(part[:half], False)
            attempt(part[half:], False)

    if items:
        attempt(items, True)
    return outcome
