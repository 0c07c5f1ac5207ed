"""The usage event and the Kafka envelope shared by ingest (producer) and aggregator (consumer).

Pure values in, values out: validation takes `now` as an argument and never reads a clock.

Envelope versions the aggregator reads:
  v1  JSON object {"v": 1, "organization_id", "api_key_id", "received_at", "events": [...]}
      carrying every event of one accepted request (they share an organization). Each event has
      id, metric, quantity (decimal string), timestamp (RFC 3339), project_id (resolved by
      ingest: the event's own, else the key's project, else null) and properties.
  v2  v1, and an event whose timestamp ingest filled in (the client sent none) carries
      "timestamp_defaulted": true. Absent (always so in v1) means the client sent the timestamp.
      Fields at their defaults (null project, no properties, false) are left out.

The identity rule (README "Identity"): an event is (organization, id). Two versions of one id are
the same event when the client sent the same metric, quantity and project, and, if both carry a
timestamp the client sent, the same timestamp. A timestamp ingest filled in never makes a conflict.
Properties are not part of the identity.
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any

import msgspec

ENVELOPE_VERSION = 2
#: Every version the aggregator and replay read (v1: written before timestamp_defaulted existed).
READABLE_VERSIONS = frozenset({1, 2})
MAX_EVENTS_PER_REQUEST = 1000
MAX_BODY_BYTES = 1024 * 1024
MAX_QUANTITY = Decimal("1e12")
#: At most 12 decimal places: with the 1e12 bound a quantity has at most 25 significant digits,
#: which PostgreSQL NUMERIC stores exactly and SUM_CONTEXT adds exactly.
MAX_QUANTITY_PLACES = 12
#: Sums of quantities (windows, periods, pricing) use this context, never the default 28 digits:
#: a million events of 1e12 with 12 places needs 31 significant digits to stay exact.
SUM_CONTEXT = Context(prec=80, rounding=ROUND_HALF_UP)
MAX_PROPERTIES = 16
MAX_PROPERTY_KEY = 64
MAX_PROPERTY_VALUE = 256
MAX_ID = 128
#: A platform key names each event's organization (its external id or id); the name is resolved
#: by ingest, which puts the organization in the envelope, so it never travels with the event.
MAX_CUSTOMER = 255
EVENT_FIELDS = frozenset(
    {"id", "metric", "quantity", "timestamp", "project_id", "properties", "customer"}
)

# The text rules as patterns that JSON Schema (ECMA 262) and Python read alike, so the OpenAPI
# document states them verbatim: `(?!\n)$` because Python's `$` also matches before a final newline.
METRIC_PATTERN = r"^[a-z][a-z0-9_.-]{0,63}(?!\n)$"
#: A quantity sent as a string: plain decimal notation, 0 to 1e12, at most 12 decimal places
#: (trailing zeros do not count); no sign, exponent, spaces or leading zeros.
QUANTITY_TEXT_PATTERN = (
    r"^(?:(?:0|[1-9][0-9]{0,11})(?:\.[0-9]{1,12}0*)?|1000000000000(?:\.0+)?)(?!\n)$"
)
#: RFC 3339 date-time with seconds and a zone (Z or +hh:mm); fractions to 9 digits (kept to the
#: microsecond); no leap second (:60), which no datetime holds.
TIMESTAMP_PATTERN = (
    r"^[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])[Tt](?:[01][0-9]|2[0-3])"
    r":[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])(?!\n)$"
)
#: A project id: a UUID in its hyphenated form, either case.
UUID_PATTERN = r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}(?!\n)$"
METRIC_RE = re.compile(METRIC_PATTERN)
QUANTITY_TEXT_RE = re.compile(QUANTITY_TEXT_PATTERN)
TIMESTAMP_RE = re.compile(TIMESTAMP_PATTERN)
UUID_RE = re.compile(UUID_PATTERN)
QUANTITY_TEXT_RULE = (
    'a JSON number or a plain decimal string such as "12.5" (no sign, exponent or spaces)'
)
TIMESTAMP_RULE = "an RFC 3339 date-time with seconds and a time zone, e.g. 2026-11-24T10:00:00Z"


def unstorable_text(value: str) -> str | None:
    """Why PostgreSQL cannot store `value` as text (or in JSONB), else None.

    PostgreSQL text holds no U+0000, and a lone UTF-16 surrogate (which JSON's "\\ud800" escape
    can give Python) has no UTF-8 encoding: either is refused at the door, never found by the
    aggregator's INSERT."""
    if "\x00" in value:
        return "contains U+0000 (NUL), which PostgreSQL cannot store"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone UTF-16 surrogate, which is not Unicode text"
    return None


class UsageEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One validated event, as it travels inside an envelope."""

    id: str
    metric: str
    quantity: Decimal
    timestamp: datetime
    project_id: uuid.UUID | None = None
    properties: dict[str, str] = msgspec.field(default_factory=dict)
    # True when the client sent no timestamp and `timestamp` is the time ingest received it:
    # such a timestamp is not part of what the client sent, so it never makes a conflict.
    timestamp_defaulted: bool = False


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    v: int
    organization_id: uuid.UUID
    api_key_id: uuid.UUID | None
    received_at: datetime
    events: list[UsageEvent]


class EnvelopeError(ValueError):
    """An envelope the aggregator cannot read; the message is the dead-letter reason."""


_encoder = msgspec.json.Encoder(decimal_format="string")
_decoder = msgspec.json.Decoder(Envelope)


def encode_envelope(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)


def decode_envelope(data: bytes) -> Envelope:
    """Decode and re-check an envelope; raises EnvelopeError with a reason fit for the DLQ."""
    try:
        envelope = _decoder.decode(data)
    except RecursionError:
        raise EnvelopeError("malformed envelope: nested too deeply") from None
    except msgspec.DecodeError as exc:
        version = _peek_version(data)
        if version is not None and version not in READABLE_VERSIONS:
            raise EnvelopeError(f"unknown envelope version {version!r}") from None
        raise EnvelopeError(f"malformed envelope: {exc}") from None
    if envelope.v not in READABLE_VERSIONS:
        raise EnvelopeError(f"unknown envelope version {envelope.v!r}")
    if not envelope.events:
        raise EnvelopeError("envelope has no events")
    for index, event in enumerate(envelope.events):
        reason = _recheck(event)
        if reason:
            raise EnvelopeError(f"events[{index}]: {reason}")
    return envelope


def _peek_version(data: bytes) -> object:
    try:
        raw = msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None
    return raw.get("v") if isinstance(raw, dict) else None


def _recheck(event: UsageEvent) -> str | None:
    if not 1 <= len(event.id) <= MAX_ID:
        return f"id must be 1-{MAX_ID} characters"
    if not METRIC_RE.match(event.metric):
        return "metric does not match ^[a-z][a-z0-9_.-]{0,63}$"
    problem = quantity_problem(event.quantity)
    if problem:
        return f"quantity {problem}"
    if event.timestamp.tzinfo is None:
        return "timestamp has no time zone"
    return None


def stored_text_problem(event: UsageEvent) -> str | None:
    """The text field of a decoded event that PostgreSQL would refuse to store, named, or None.

    Ingest refuses such events since it checks; this catches those already on the topic (and
    any other producer's), so the aggregator can dead-letter the one event alone. Only what the
    aggregator writes counts here (the id in the ledger, the metric in usage_records): an old
    event with an odd property was counted when it arrived and must count the same on replay."""
    for name, value in (("id", event.id), ("metric", event.metric)):
        problem = unstorable_text(value)
        if problem:
            return f"{name} {problem}"
    return None


def parse_quantity(value: Any) -> Decimal:
    """An exact Decimal from a JSON number or decimal string; ValueError names the problem."""
    if isinstance(value, bool):
        raise ValueError("must be a number or a decimal string")
    if isinstance(value, Decimal):
        # JSON numbers decoded exactly (a decoder's float_hook=Decimal), as ingest does.
        quantity = value
    elif isinstance(value, int):
        quantity = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("must be finite")
        # repr() is the shortest round-tripping text: 0.1 stays 0.1, not 0.1000000000000000055...
        quantity = Decimal(repr(value))
    elif isinstance(value, str):
        if not QUANTITY_TEXT_RE.match(value):
            raise ValueError(
                f"must be {QUANTITY_TEXT_RULE}, 0 to 1e12, at most "
                f"{MAX_QUANTITY_PLACES} decimal places"
            )
        quantity = Decimal(value)
    else:
        raise ValueError("must be a number or a decimal string")
    problem = quantity_problem(quantity)
    if problem:
        raise ValueError(problem)
    if quantity == 0:
        return Decimal(0)
    return quantity


def quantity_from_json(raw: bytes) -> Decimal | None:
    """The quantity of one raw JSON value (ingest's fast path), or None when it is not a valid
    quantity as written; parse_quantity then says why (it also reads escaped strings)."""
    text = raw.decode()
    if text[:1] == '"':
        text = text[1:-1]
        if not QUANTITY_TEXT_RE.match(text):
            return None
    elif not QUANTITY_TEXT_RE.match(text):
        # A number the plain pattern does not cover (an exponent, -0, a fraction past the 12th
        # place): its value decides.
        if text[:1] not in "-0123456789" or not text:
            return None
        quantity = Decimal(text)
        if quantity_problem(quantity):
            return None
        return quantity if quantity else Decimal(0)
    # The pattern already holds the range and the places.
    quantity = Decimal(text)
    return quantity if quantity else Decimal(0)


def quantity_problem(quantity: Decimal) -> str | None:
    """Why `quantity` cannot be counted exactly, or None: finite, 0..1e12, at most 12 places."""
    if not quantity.is_finite():
        return "must be finite"
    if quantity < 0 or quantity > MAX_QUANTITY:
        return "must be between 0 and 1e12"
    _, digits, exponent = quantity.as_tuple()
    assert isinstance(exponent, int)
    # Trailing zeros do not count as places: 1.000000000000000 is 1.
    trailing = len(digits) - len(bytes(digits).rstrip(b"\x00")) if exponent < 0 else 0
    if exponent + min(trailing, -exponent) < -MAX_QUANTITY_PLACES:
        return f"may have at most {MAX_QUANTITY_PLACES} decimal places"
    return None


def decimal_text(value: Decimal) -> str:
    """A quantity as wire text: plain notation without trailing zeros, never an exponent
    (str() gives "1E-7" or "1.0E+3"): 1.50 -> "1.5", 1E+3 -> "1000", 1E-7 -> "0.0000001"."""
    return format(value.normalize(SUM_CONTEXT), "f") if value else "0"


def parse_timestamp(value: Any) -> datetime:
    """A UTC datetime from RFC 3339 text (TIMESTAMP_PATTERN); ValueError names the problem."""
    if not isinstance(value, str) or not TIMESTAMP_RE.match(value):
        raise ValueError(f"must be {TIMESTAMP_RULE}")
    return timestamp_from_text(value)


def timestamp_from_text(text: str) -> datetime:
    """A UTC datetime from text that matched TIMESTAMP_PATTERN (the fast path checks it in C)."""
    try:
        parsed = datetime.fromisoformat(text.upper())
    except ValueError:
        raise ValueError(f"is not a calendar date-time: {text}") from None
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range") from None


def validate_event(
    raw: Any,
    *,
    now: datetime,
    horizon: timedelta,
    max_future: timedelta,
) -> UsageEvent | list[str]:
    """A UsageEvent, or every reason `raw` is not one (field named in each reason)."""
    if not isinstance(raw, dict):
        return ["event must be a JSON object"]
    problems: list[str] = []
    unknown = raw.keys() - EVENT_FIELDS
    if unknown:
        problems.append(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")

    event_id = raw.get("id")
    if not isinstance(event_id, str) or not 1 <= len(event_id) <= MAX_ID:
        problems.append(f"id: required, a string of 1-{MAX_ID} characters")
    elif text_problem := unstorable_text(event_id):
        problems.append(f"id: {text_problem}")

    metric = raw.get("metric")
    if isinstance(metric, str) and (text_problem := unstorable_text(metric)):
        problems.append(f"metric: {text_problem}")
    elif not isinstance(metric, str) or not METRIC_RE.match(metric):
        problems.append("metric: required, must match ^[a-z][a-z0-9_.-]{0,63}$")

    quantity = Decimal(1)
    if "quantity" in raw:
        try:
            quantity = parse_quantity(raw["quantity"])
        except ValueError as exc:
            problems.append(f"quantity: {exc}")

    timestamp = now
    defaulted = raw.get("timestamp") is None
    if not defaulted:
        try:
            timestamp = parse_timestamp(raw["timestamp"])
        except ValueError as exc:
            problems.append(f"timestamp: {exc}")
        else:
            if timestamp > now + max_future:
                problems.append(
                    f"timestamp: more than {int(max_future.total_seconds())} seconds in the future"
                )
            elif timestamp < now - horizon:
                problems.append(f"timestamp: older than the lateness horizon ({horizon.days} days)")

    project_id, project_problems = _parse_project_id(raw.get("project_id"))
    properties, property_problems = _parse_properties(raw.get("properties"))
    problems += project_problems + property_problems + customer_problems(raw.get("customer"))

    if problems:
        return problems
    assert isinstance(event_id, str) and isinstance(metric, str)
    return UsageEvent(
        id=event_id,
        metric=metric,
        quantity=quantity,
        timestamp=timestamp,
        project_id=project_id,
        properties=properties,
        timestamp_defaulted=defaulted,
    )


def customer_problems(value: Any) -> list[str]:
    """Why `value` cannot name a customer (absent or null names none)."""
    if value is None:
        return []
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_CUSTOMER:
        return [f"customer: a string of 1-{MAX_CUSTOMER} characters (an external id or id)"]
    if text_problem := unstorable_text(value):
        return [f"customer: {text_problem}"]
    return []


def _parse_project_id(value: Any) -> tuple[uuid.UUID | None, list[str]]:
    if value is None:
        return None, []
    if isinstance(value, str) and (text_problem := unstorable_text(value)):
        return None, [f"project_id: {text_problem}"]
    if isinstance(value, str) and UUID_RE.match(value):
        return uuid.UUID(value), []
    return None, ["project_id: must be a project id (a UUID, hyphenated) or null"]


def _parse_properties(value: Any) -> tuple[dict[str, str], list[str]]:
    # Absent or null means none; any other non-object (false, 0, "", []) is refused.
    if value is None:
        return {}, []
    if not isinstance(value, dict):
        return {}, ["properties: must be an object of string -> string, or null"]
    if len(value) > MAX_PROPERTIES:
        return value, [f"properties: at most {MAX_PROPERTIES} pairs"]
    if not all(
        isinstance(k, str)
        and isinstance(v, str)
        and len(k) <= MAX_PROPERTY_KEY
        and len(v) <= MAX_PROPERTY_VALUE
        for k, v in value.items()
    ):
        return value, [
            f"properties: keys and values must be strings (keys <= {MAX_PROPERTY_KEY}, "
            f"values <= {MAX_PROPERTY_VALUE} characters)"
        ]
    return value, _property_text_problems(value)


def _property_text_problems(properties: dict[str, str]) -> list[str]:
    problems = []
    for name, value in properties.items():
        # repr(): the reason quotes the name with its NUL or surrogate escaped, never raw.
        if text_problem := unstorable_text(name):
            problems.append(f"properties: the name {name!r} {text_problem}")
        elif text_problem := unstorable_text(value):
            problems.append(f"properties.{name}: {text_problem}")
    return problems


def fingerprint(event: UsageEvent) -> bytes:
    """The digest of what the client sent: metric, quantity, project, and the timestamp only
    when the client sent it (an event ingest timed has the same digest whenever it arrives)."""
    return identity_digest(event, None if event.timestamp_defaulted else event.timestamp)


def identity_digest(event: UsageEvent, timestamp: datetime | None) -> bytes:
    """metric, quantity and project of `event` with `timestamp` (None: no timestamp), 16 bytes.

    With a timestamp the text is the one every ledger row was written with before
    timestamp_defaulted existed, so those rows compare as they always did. No RFC 3339 text is
    empty, so the digest without a timestamp never equals one with."""
    quantity = event.quantity.normalize() if event.quantity else Decimal(0)
    text = "\x1f".join(
        (
            event.metric,
            format(quantity, "f"),
            timestamp.astimezone(UTC).isoformat() if timestamp is not None else "",
            str(event.project_id or ""),
        )
    )
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def window_start(timestamp: datetime, window_seconds: int) -> datetime:
    """The start of the aggregation window that holds `timestamp` (windows align to the epoch)."""
    epoch = int(timestamp.timestamp())
    return datetime.fromtimestamp(epoch - epoch % window_seconds, tz=UTC)
