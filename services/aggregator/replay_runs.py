"""The record of replays (`replay_runs`, written by replay.py): newest first, for people to read."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.models import ReplayRun


@dataclass(frozen=True, slots=True)
class ReplayRunPage:
    runs: list[ReplayRun]
    total: int


def list_replay_runs(session: Session, *, limit: int = 50, offset: int = 0) -> ReplayRunPage:
    total = session.scalar(sa.select(sa.func.count()).select_from(ReplayRun)) or 0
    runs = session.scalars(
        sa.select(ReplayRun)
        .order_by(ReplayRun.created_at.desc(), ReplayRun.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return ReplayRunPage(list(runs), int(total))
