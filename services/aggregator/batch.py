"""The pure core of a batch: Kafka records in, countable events and dead letters out.

No session, clock or network here: the ledger's answers come in as arguments, so every rule (what
is unreadable, what is too old, which duplicate wins) is a value-in, value-out function. No rule
reads the clock: what counts is decided by what ingest accepted (its received_at), never by how
late the aggregator gets to it.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import NamedTuple, Protocol

from shared.events import (
    ENVELOPE_VERSION,
    SUM_CONTEXT,
    Envelope,
    EnvelopeError,
    UsageEvent,
    decode_envelope,
    encode_envelope,
    fingerprint,
    identity_digest,
    stored_text_problem,
    window_start,
)
from shared.usage import UsageDelta, UsageWindow
from shared.usage_cuts import CutEvent

EventKey = tuple[uuid.UUID, str]
"""(organization id, event id): the identity the ledger counts once."""

WindowKey = tuple[uuid.UUID, uuid.UUID | None, uuid.UUID | None, str, datetime]
"""(organization, project, api key, metric, window start): one usage_records row."""


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """One Kafka message, as read from the events topic."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record (or one event of it) that is not counted, with the reason it goes to the DLQ."""

    source: SourceRecord
    code: str
    reason: str
    retryable: bool
    # The whole record's bytes when the record itself is refused; None when only `event` is.
    raw: bytes | None
    event: CountableEvent | None = None

    @property
    def payload(self) -> bytes:
        """What `meterline replay dlq` would re-publish: the original bytes, or a one-event
        envelope when only one event of a request is refused."""
        if self.raw is not None:
            return self.raw
        assert self.event is not None
        return envelope_of([self.event])


@dataclass(frozen=True, slots=True)
class CountableEvent:
    """A readable event with what the ledger and the window upsert need."""

    organization_id: uuid.UUID
    api_key_id: uuid.UUID | None
    received_at: datetime
    event: UsageEvent
    fingerprint: bytes
    window_start: datetime
    source: SourceRecord

    @property
    def key(self) -> EventKey:
        return (self.organization_id, self.event.id)

    @property
    def event_time(self) -> datetime:
        return self.event.timestamp

    def as_envelope(self) -> bytes:
        """This event alone, in the envelope format, for a dead letter about it alone."""
        return envelope_of([self])


def envelope_of(events: Sequence[CountableEvent]) -> bytes:
    """Events of one source record (one organization, key and receipt) as one envelope."""
    first = events[0]
    return encode_envelope(
        Envelope(
            v=ENVELOPE_VERSION,
            organization_id=first.organization_id,
            api_key_id=first.api_key_id,
            received_at=first.received_at,
            events=[e.event for e in events],
        )
    )


class Counted(Protocol):
    """A counted version of an event: a ledger row (CountedVersion) or an event of the batch."""

    @property
    def fingerprint(self) -> bytes: ...

    @property
    def event_time(self) -> datetime: ...


class CountedVersion(NamedTuple):
    """What the ledger holds of the version of an event that was counted."""

    fingerprint: bytes
    event_time: datetime


def counted_version(event: CountableEvent) -> CountedVersion:
    return CountedVersion(event.fingerprint, event.event.timestamp)


def is_repeat(counted: Counted, event: CountableEvent) -> bool:
    """The identity rule: `event` is the counted event again (a duplicate, not a conflict) when
    the client sent the same metric, quantity and project and, if both versions carry a timestamp
    the client sent, the same timestamp. A timestamp ingest filled in agrees with any other."""
    if event.fingerprint == counted.fingerprint:
        return True
    usage = event.event
    if usage.timestamp_defaulted:
        # The repeat's time is ingest's: compare the rest at the counted version's own time (a
        # counted version that was timed by ingest too has the same fingerprint and matched above).
        return identity_digest(usage, counted.event_time) == counted.fingerprint
    # The repeat's time is the client's: it agrees with a counted version ingest timed.
    return identity_digest(usage, None) == counted.fingerprint


@dataclass(frozen=True, slots=True)
class ReadRules:
    """The bounds an event must meet to be counted."""

    lateness_horizon: timedelta  # how far an event may be behind the time ingest received it
    max_future: timedelta  # how far an event may be ahead of the time ingest received it
    window_seconds: int


# Reasons that a later fix (new code, repaired reference data) can cure: `replay dlq` re-sends them.
RETRYABLE_CODES = frozenset(
    {"unknown_version", "unknown_reference", "database_rejected", "ledger_partition_missing"}
)


def dead_letter(source: SourceRecord, code: str, reason: str, payload: bytes) -> DeadLetter:
    """A dead letter about a whole record: `payload` is re-published as it is."""
    return DeadLetter(
        source=source, code=code, reason=reason, retryable=code in RETRYABLE_CODES, raw=payload
    )


def event_letter(event: CountableEvent, code: str, reason: str) -> DeadLetter:
    """A dead letter about one event of a record (its envelope is built when it is sent, with
    the other refused events of the same record)."""
    return DeadLetter(
        source=event.source,
        code=code,
        reason=reason,
        retryable=code in RETRYABLE_CODES,
        raw=None,
        event=event,
    )


def read_records(
    records: Iterable[SourceRecord], rules: ReadRules
) -> tuple[list[CountableEvent], list[DeadLetter]]:
    """Decode every record; the unreadable and the out-of-bounds become dead letters."""
    events: list[CountableEvent] = []
    dead: list[DeadLetter] = []
    for record in records:
        try:
            envelope = decode_envelope(record.value)
        except EnvelopeError as exc:
            code = "unknown_version" if str(exc).startswith("unknown envelope") else "malformed"
            dead.append(dead_letter(record, code, str(exc), record.value))
            continue
        for usage in envelope.events:
            countable = CountableEvent(
                organization_id=envelope.organization_id,
                api_key_id=envelope.api_key_id,
                received_at=envelope.received_at,
                event=usage,
                fingerprint=fingerprint(usage),
                window_start=window_start(usage.timestamp, rules.window_seconds),
                source=record,
            )
            problem = _out_of_bounds(countable, rules) or _unstorable(countable)
            if problem:
                dead.append(event_letter(countable, *problem))
            else:
                events.append(countable)
    return events, dead


def _unstorable(event: CountableEvent) -> tuple[str, str] | None:
    # Ingest refuses these since it checks; older records may still hold them. Refused here,
    # the event goes alone and the rest of its request still counts.
    problem = stored_text_problem(event.event)
    if problem is None:
        return None
    return ("unstorable_text", f"event {event.event.id!r}: {problem}")


def _out_of_bounds(event: CountableEvent, rules: ReadRules) -> tuple[str, str] | None:
    # Ingest's own rule at receipt: an envelope that passes it was answered 202 and must count.
    if event.event.timestamp < event.received_at - rules.lateness_horizon:
        return (
            "too_old",
            f"event {event.event.id!r}: timestamp {event.event.timestamp.isoformat()} is more "
            f"than {rules.lateness_horizon.days} days before received_at",
        )
    if event.event.timestamp > event.received_at + rules.max_future:
        return (
            "too_far_ahead",
            f"event {event.event.id!r}: timestamp is more than "
            f"{int(rules.max_future.total_seconds())} seconds after received_at",
        )
    return None


def split_at_ledger_floor(
    events: Sequence[CountableEvent], floor: datetime | None
) -> tuple[list[CountableEvent], list[DeadLetter]]:
    """Events below the ledger's floor (their partition was pruned) cannot be deduplicated:
    counting them could count twice, dropping them would lose them; they become retryable
    dead letters."""
    if floor is None:
        return list(events), []
    kept: list[CountableEvent] = []
    dead: list[DeadLetter] = []
    for e in events:
        if e.event.timestamp >= floor:
            kept.append(e)
            continue
        reason = (
            f"event {e.event.id!r}: the ledger partition of {e.event.timestamp:%Y-%m} was pruned "
            f"(ledger floor {floor.isoformat()}), so it cannot be deduplicated; re-publish it "
            "with `meterline replay dlq` once that month's partition is restored"
        )
        dead.append(event_letter(e, "ledger_partition_missing", reason))
    return kept, dead


@dataclass(slots=True)
class Selection:
    """A batch split by the ledger: the events to count, the repeats, the conflicting repeats."""

    new: list[CountableEvent] = field(default_factory=list)
    duplicates: int = 0
    conflicts: list[CountableEvent] = field(default_factory=list)


def select_new_events(
    events: Sequence[CountableEvent], recorded: Mapping[EventKey, CountedVersion]
) -> Selection:
    """First accepted wins: against the ledger, then within the batch in offset order.

    `recorded` maps (organization, event id) to the version the ledger counted. A repeat of it
    (`is_repeat`) is a duplicate (a retry or a redelivery); anything else with that id is a
    conflicting duplicate, not counted, and sent to the DLQ by the caller.
    """
    selection = Selection()
    seen: dict[EventKey, Counted] = dict(recorded)
    for event in events:
        earlier = seen.get(event.key)
        if earlier is None:
            seen[event.key] = event
            selection.new.append(event)
        elif is_repeat(earlier, event):
            selection.duplicates += 1
        else:
            selection.conflicts.append(event)
    return selection


def conflict_letter(event: CountableEvent) -> DeadLetter:
    return event_letter(
        event,
        "conflicting_duplicate",
        f"event {event.event.id!r} was already counted with different content (metric, "
        "quantity, project, or a timestamp the client sent both times); the first accepted "
        "version wins",
    )


@dataclass(frozen=True, slots=True)
class WindowTotal:
    quantity: Decimal
    event_count: int


def sum_windows(events: Iterable[CountableEvent]) -> dict[WindowKey, WindowTotal]:
    """Quantity and count per usage_records window of the given events, summed exactly.

    SUM_CONTEXT, not the ambient 28-digit context: 1e4 events of 1e12 with 12 places already need
    29 significant digits, and `+` would round them silently."""
    quantity: dict[WindowKey, Decimal] = defaultdict(Decimal)
    count: dict[WindowKey, int] = defaultdict(int)
    for e in events:
        key = (e.organization_id, e.event.project_id, e.api_key_id, e.event.metric, e.window_start)
        quantity[key] = SUM_CONTEXT.add(quantity[key], e.event.quantity)
        count[key] += 1
    return {k: WindowTotal(quantity[k], count[k]) for k in quantity}


def usage_deltas(totals: Mapping[WindowKey, WindowTotal], window_seconds: int) -> list[UsageDelta]:
    """The windows' totals in the shape shared.usage writes."""
    return [
        UsageDelta(*key, window_seconds, total.quantity, total.event_count)
        for key, total in totals.items()
    ]


def usage_windows(keys: Iterable[WindowKey], window_seconds: int) -> list[UsageWindow]:
    return [UsageWindow(*key, window_seconds) for key in keys]


def cut_events(events: Iterable[CountableEvent]) -> list[CutEvent]:
    """What each event contributes to the usage cuts in its window."""
    return [
        CutEvent(
            e.organization_id, e.event.timestamp, e.window_start, e.event.metric, e.event.quantity
        )
        for e in events
    ]
