"""What is sold and to whom: plans (with metered prices in `features`) and subscriptions."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base, IdMixin, TimestampMixin


class SubscriptionStatus(enum.StrEnum):
    """Stripe's subscription statuses, verbatim."""

    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    UNPAID = "unpaid"
    CANCELED = "canceled"
    INCOMPLETE = "incomplete"
    INCOMPLETE_EXPIRED = "incomplete_expired"
    PAUSED = "paused"


class BillingInterval(enum.StrEnum):
    MONTH = "month"
    YEAR = "year"


def _values(enum_cls: type[enum.Enum]) -> list[str]:
    return [str(member.value) for member in enum_cls]


class Plan(IdMixin, TimestampMixin, Base):
    __tablename__ = "plans"

    key: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    # Flat fees in the currency's minor units (cents for USD), as Stripe counts them.
    price_monthly: Mapped[int] = mapped_column(Integer, default=0)
    price_yearly: Mapped[int] = mapped_column(Integer, default=0)
    currency: Mapped[str] = mapped_column(String(3), default="usd")
    stripe_price_id_monthly: Mapped[str | None] = mapped_column(String(255))
    stripe_price_id_yearly: Mapped[str | None] = mapped_column(String(255))
    features: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())


#: The statuses in which an organization holds its subscription (shared.subscriptions'
#: LIVE_STATUSES): at most one row per organization may be in one, which the database enforces.
LIVE_STATUS_VALUES = ("trialing", "active", "past_due", "unpaid", "paused", "incomplete")


class Subscription(IdMixin, TimestampMixin, Base):
    __tablename__ = "subscriptions"
    __table_args__ = (
        Index(
            "uq_subscriptions_one_live_per_organization",
            "organization_id",
            unique=True,
            postgresql_where=text(
                "status IN (" + ", ".join(f"'{status}'" for status in LIVE_STATUS_VALUES) + ")"
            ),
        ),
        # Billing updates every subscription's period and billing state: room on each page keeps
        # those updates in place (HOT), without touching the indexes.
        {"postgresql_with": {"fillfactor": "80"}},
    )

    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    plan_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("plans.id"), index=True)
    status: Mapped[SubscriptionStatus] = mapped_column(
        Enum(SubscriptionStatus, name="subscription_status", values_callable=_values)
    )
    billing_interval: Mapped[BillingInterval] = mapped_column(
        Enum(BillingInterval, name="billing_interval", values_callable=_values)
    )
    current_period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    current_period_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Where periods are counted from, as Stripe's billing_cycle_anchor: every period boundary is
    # this day and time of day, clamped to the month. NULL (rows from before it was stored) means
    # the current_period_start.
    billing_cycle_anchor: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean, default=False)
    canceled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    trial_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    stripe_subscription_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255))
    # The id the integrator's own system knows this subscription by (Lago's
    # external_subscription_id names the organization of an event through it).
    external_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    # `created` of the last Stripe event applied to this subscription: an older event arriving
    # late is recorded as processed but changes nothing.
    stripe_event_created: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # What billing last billed the subscription from (a fingerprint of its terms, phases, plan
    # prices, Stripe customer and its organization's usage version) and for which `as_of` range
    # that result holds by time alone: a run that finds both unchanged skips it.
    billed_fingerprint: Mapped[str | None] = mapped_column(String(64))
    billed_from: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    billed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SubscriptionPhase(IdMixin, TimestampMixin, Base):
    """The plan a subscription is on from `starts_at` until the next phase: a plan change at an
    instant starts a phase there, and billing prices each part of a period on its own phase's
    plan. A subscription without phases (rows from before they were stored) is on its plan."""

    __tablename__ = "subscription_phases"
    __table_args__ = (UniqueConstraint("subscription_id", "starts_at"),)

    subscription_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("subscriptions.id", ondelete="CASCADE")
    )
    plan_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("plans.id"))
    starts_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PlanVersion(IdMixin, Base):
    """A plan's prices as they were from `effective_at` on, written by a trigger on every insert
    and every change of a price (whoever makes it), so billing prices a closed period as the plan
    stood when the period ended, never as it was edited later."""

    __tablename__ = "plan_versions"
    __table_args__ = (Index("ix_plan_versions_plan_id_effective_at", "plan_id", "effective_at"),)

    plan_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("plans.id", ondelete="CASCADE"))
    effective_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    price_monthly: Mapped[int] = mapped_column(Integer)
    price_yearly: Mapped[int] = mapped_column(Integer)
    currency: Mapped[str] = mapped_column(String(3))
    features: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )
