"""Meters and the usage they keep per dimension values.

A meter gives a metric an aggregation and the event properties it groups by (`meters`). The
aggregator keeps, beside usage_records, one `meter_windows` row per window and dimension values
(every aggregation's running value at once) and, for a unique_count meter, the distinct values
seen in each window (`meter_values`): a count over any range is then COUNT(DISTINCT value) over
the range's windows, exact, never a sum of per-window counts.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    PrimaryKeyConstraint,
    String,
    Table,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base, IdMixin, TimestampMixin

# The upsert target, led by what every read and replay ranges over (an organization's metric over
# a span of windows), so that one index serves both and the hot path maintains no other.
METER_WINDOW_KEY = (
    "organization_id",
    "metric",
    "window_start",
    "window_seconds",
    "project_id",
    "api_key_id",
    "dimensions",
)


class Meter(IdMixin, TimestampMixin, Base):
    """One metric's aggregation and dimensions, applied by `meterline meters apply`."""

    __tablename__ = "meters"

    metric: Mapped[str] = mapped_column(String(64), unique=True)
    aggregation: Mapped[str] = mapped_column(String(16))
    dimensions: Mapped[list[str]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    # The property a unique_count counts the distinct values of.
    property: Mapped[str | None] = mapped_column(String(64))
    # The property holding the event's value, for event shapes that carry it there (CloudEvents,
    # Lago); stored and listed, read by those ingest paths.
    value_property: Mapped[str | None] = mapped_column(String(64))


class MeterWindow(IdMixin, TimestampMixin, Base):
    """A window of a metered metric for one set of dimension values: every aggregation at once
    (sum, count, max, min and the latest event's value with its time and id)."""

    __tablename__ = "meter_windows"
    __table_args__ = (
        Index(
            "uq_meter_windows_window",
            *METER_WINDOW_KEY,
            unique=True,
            postgresql_nulls_not_distinct=True,
        ),
        # Every batch updates the windows it adds to: room on each page keeps those updates in
        # place (HOT), without new index entries (migration 0025).
        {"postgresql_with": {"fillfactor": "70"}},
    )

    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE")
    )
    project_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("projects.id"))
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id"))
    metric: Mapped[str] = mapped_column(String(64))
    # The meter's dimension properties and the event's values of them; a missing one is absent.
    dimensions: Mapped[dict[str, Any]] = mapped_column(JSONB)
    window_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    window_seconds: Mapped[int] = mapped_column(Integer)
    quantity: Mapped[Decimal] = mapped_column(Numeric)
    event_count: Mapped[int] = mapped_column(BigInteger)
    max_quantity: Mapped[Decimal] = mapped_column(Numeric)
    min_quantity: Mapped[Decimal] = mapped_column(Numeric)
    latest_quantity: Mapped[Decimal] = mapped_column(Numeric)
    latest_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    latest_event_id: Mapped[str] = mapped_column(String(128))


# A distinct value of a unique_count meter's property seen in one window. One row per distinct
# value and window is the hot path's costliest write, so the table holds only its unique index
# (no surrogate key, no second index, no foreign key): a Core table, never an ORM class. Each
# row is written in the statement that upserts its meter_windows row, whose keys check the
# organization, project and key; an organization's deletion removes its rows by a trigger
# (migration 0024), as ON DELETE CASCADE would.
meter_values = Table(
    "meter_values",
    Base.metadata,
    Column("organization_id", Uuid, nullable=False),
    Column("project_id", Uuid, nullable=True),
    Column("api_key_id", Uuid, nullable=True),
    Column("metric", String(64), nullable=False),
    Column("dimensions", JSONB, nullable=False),
    Column("window_start", DateTime(timezone=True), nullable=False),
    Column("window_seconds", Integer, nullable=False),
    Column("value", String(256), nullable=False),
    # The value before the dimensions: a descent of this index compares two JSONB values only
    # between rows of the same value (migration 0026).
    Index(
        "uq_meter_values_value",
        "organization_id",
        "metric",
        "window_start",
        "window_seconds",
        "value",
        "project_id",
        "api_key_id",
        "dimensions",
        unique=True,
        postgresql_nulls_not_distinct=True,
    ),
)


# A meter window that holds a registered usage cut, kept also as pieces split at its cuts: one row
# per piece (from the window start or a cut to the next cut or the window end) and dimension
# values, summed over projects and keys, with every aggregation at once, as meter_windows has
# them (shared.meter_pieces). Billing takes a cut window's pieces on each side of the cut.
METER_PIECE_KEY = (
    "organization_id",
    "metric",
    "window_start",
    "window_seconds",
    "dimensions",
    "piece_start",
)


def _piece_key_columns() -> list[Column[Any]]:
    return [
        Column(
            "organization_id",
            Uuid,
            ForeignKey("organizations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        Column("metric", String(64), nullable=False),
        Column("window_start", DateTime(timezone=True), nullable=False),
        Column("window_seconds", Integer, nullable=False),
        Column("dimensions", JSONB, nullable=False),
        Column("piece_start", DateTime(timezone=True), nullable=False),
    ]


meter_pieces = Table(
    "meter_pieces",
    Base.metadata,
    *_piece_key_columns(),
    Column("quantity", Numeric, nullable=False),
    Column("event_count", BigInteger, nullable=False),
    Column("max_quantity", Numeric, nullable=False),
    Column("min_quantity", Numeric, nullable=False),
    Column("latest_quantity", Numeric, nullable=False),
    Column("latest_at", DateTime(timezone=True), nullable=False),
    Column("latest_event_id", String(128), nullable=False),
    PrimaryKeyConstraint(*METER_PIECE_KEY, name="pk_meter_pieces"),
)

# The distinct values of a unique_count meter's property seen in each piece.
meter_piece_values = Table(
    "meter_piece_values",
    Base.metadata,
    *_piece_key_columns(),
    Column("value", String(256), nullable=False),
    PrimaryKeyConstraint(*METER_PIECE_KEY, "value", name="pk_meter_piece_values"),
)
