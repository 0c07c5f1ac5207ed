"""The terms an invoice is priced on: each plan's price versions, and per segment of a period the
plan and prices it was billed with (the invoice's stored pricing). Pure values.

A segment is priced as its plan stood at the segment's end (a plan edited after a period ended
never re-prices it); a segment still open at `as_of` as the plan stands at `as_of`.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.billing.pricing import MeteredPrice, PlanPrice, PricedFilter, filter_label
from services.billing.schemas import plan_price


@functools.lru_cache(maxsize=100_000)
def iso(moment: datetime) -> str:
    """`moment.isoformat()`, remembered: a run writes the same few period bounds many times."""
    return moment.isoformat()


@dataclass(frozen=True)
class PlanVersionTerms:
    effective_at: datetime
    price_monthly: int
    price_yearly: int
    currency: str
    metered_json: str  # features.metered as canonical JSON
    id: uuid.UUID | None = None  # plan_versions.id (None: a plan from before versions)

    def flat_amount(self, interval: str) -> int:
        return self.price_yearly if interval == "year" else self.price_monthly


@dataclass(frozen=True)
class PlanHistory:
    plan_id: uuid.UUID
    key: str
    name: str
    versions: tuple[PlanVersionTerms, ...]  # oldest first, never empty

    def __hash__(self) -> int:
        # Every pricing of a run hashes its plans (the pricings are cached): the id alone is
        # cheap, and equal histories share it.
        return hash(self.plan_id)

    def as_of(self, moment: datetime, *, ended: bool) -> PlanVersionTerms:
        """The version in effect at `moment`; `ended`: the moment is the end of what is priced,
        which an edit made at that very instant does not reach."""
        chosen = self.versions[0]
        for version in self.versions:
            if version.effective_at < moment or (not ended and version.effective_at == moment):
                chosen = version
        return chosen


def canonical_metered(features: Mapping[str, Any] | None) -> str:
    return json.dumps((features or {}).get("metered") or {}, sort_keys=True)


@functools.lru_cache(maxsize=4096)
def _metered_document(metered_json: str) -> Any:
    # Shared between snapshots and never mutated: snapshots only serialise it.
    return json.loads(metered_json)


@functools.lru_cache(maxsize=4096)
def metered_price(metered_json: str, flat_amount: int) -> PlanPrice:
    """The pricing view of a plan's metered prices (parsed once per distinct text)."""
    return plan_price({"metered": json.loads(metered_json)}, flat_amount)


@functools.lru_cache(maxsize=4096)
def metric_names(metered_json: str) -> tuple[frozenset[str], frozenset[str]]:
    """The metrics a set of metered prices prices, and those of them aggregated by max."""
    metered = metered_price(metered_json, 0).metered
    return frozenset(metered), frozenset(m for m, p in metered.items() if p.aggregation == "max")


@functools.lru_cache(maxsize=4096)
def priced_filters(metered_json: str) -> tuple[PricedFilter, ...]:
    """The prices per dimension filter among a set of metered prices (their quantities come
    from the meters' windows, services/billing/filter_totals.py, not from usage_records)."""
    metered = metered_price(metered_json, 0).metered
    return tuple(p.priced_filter for _, p in sorted(metered.items()) if p.priced_filter)


@functools.lru_cache(maxsize=4096)
def query_names(
    metered_json: str,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[PricedFilter, ...]]:
    """What a usage query of these prices asks for, each sorted: the metrics read from
    usage_records (a price per filter is read from its meter's windows instead), those of them
    totalled by max, and the prices per filter."""
    names, largest = metric_names(metered_json)
    filters = priced_filters(metered_json)
    labels = {filter_label(f.metric, f.match) for f in filters}
    return (
        tuple(sorted(names - labels)),
        tuple(sorted(largest)),
        tuple(sorted(filters, key=lambda f: filter_label(f.metric, f.match))),
    )


@dataclass(frozen=True)
class SegmentTerms:
    """One segment of a period and the plan terms it is priced on."""

    start: datetime
    end: datetime
    plan_id: uuid.UUID | None
    plan_key: str
    plan_name: str
    flat_amount: int  # the plan's flat fee for a whole period of the interval
    metered_json: str
    version_id: uuid.UUID | None = None

    def __hash__(self) -> int:
        # Cheap (equal terms share their start and prices): segments key the cached lines.
        return hash((self.start, self.metered_json))

    @property
    def price(self) -> PlanPrice:
        return metered_price(self.metered_json, self.flat_amount)

    @functools.cached_property
    def sorted_metered(self) -> list[tuple[str, MeteredPrice]]:
        return sorted(self.price.metered.items())


@dataclass(frozen=True)
class InvoicePricing:
    """What an invoice was priced with (`invoices.plan_snapshot`)."""

    segments: tuple[SegmentTerms, ...]
    trial: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 2,
            "trial": self.trial,
            "segments": [_segment_json(s) for s in self.segments],
        }

    @classmethod
    def from_json(
        cls,
        snapshot: Mapping[str, Any] | None,
        start: datetime,
        end: datetime,
        versions: Mapping[uuid.UUID, str] | None = None,
    ) -> InvoicePricing | None:
        """A stored snapshot; one of the first release ({"plan_id", "flat_amount", "metered"})
        is one segment over the invoice's period. None: the invoice stored none. A segment that
        names its plan version takes the version's metered prices from `versions`."""
        if not snapshot:
            return None
        trial = bool(snapshot.get("trial"))
        if snapshot.get("version") != 2:
            plan_id = snapshot.get("plan_id")
            return cls(
                (
                    SegmentTerms(
                        start,
                        end,
                        uuid.UUID(plan_id) if plan_id else None,
                        "",
                        "",
                        int(snapshot.get("flat_amount") or 0),
                        json.dumps(snapshot.get("metered") or {}, sort_keys=True),
                    ),
                ),
                trial,
            )
        return cls(tuple(_segment(raw, versions or {}) for raw in snapshot["segments"]), trial)


def referenced_versions(snapshots: Iterable[Mapping[str, Any] | None]) -> set[uuid.UUID]:
    """The plan versions these stored snapshots name."""
    return {
        uuid.UUID(raw["version_id"])
        for snapshot in snapshots
        if snapshot and snapshot.get("version") == 2
        for raw in snapshot["segments"]
        if raw.get("version_id")
    }


def _segment_json(segment: SegmentTerms) -> dict[str, Any]:
    # A version's prices never change, so a snapshot names the version instead of copying them.
    document: dict[str, Any] = {
        "start": iso(segment.start),
        "end": iso(segment.end),
        "plan_id": str(segment.plan_id) if segment.plan_id else None,
        "plan_key": segment.plan_key,
        "plan_name": segment.plan_name,
        "flat_amount": segment.flat_amount,
    }
    if segment.version_id is not None:
        document["version_id"] = str(segment.version_id)
    else:
        document["metered"] = _metered_document(segment.metered_json)
    return document


def _segment(raw: Mapping[str, Any], versions: Mapping[uuid.UUID, str]) -> SegmentTerms:
    version_id = uuid.UUID(raw["version_id"]) if raw.get("version_id") else None
    metered = (
        versions[version_id]
        if version_id is not None
        else json.dumps(raw.get("metered") or {}, sort_keys=True)
    )
    return SegmentTerms(
        datetime.fromisoformat(raw["start"]),
        datetime.fromisoformat(raw["end"]),
        uuid.UUID(raw["plan_id"]) if raw.get("plan_id") else None,
        raw.get("plan_key") or "",
        raw.get("plan_name") or "",
        int(raw["flat_amount"]),
        metered,
        version_id,
    )
