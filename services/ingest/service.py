"""The decisions of ingest: who is asking, may they, are the events valid, what goes on the topic.

A request goes: authenticate -> rate limit -> parse and validate -> resolve each event's
organization (a platform key's customers, customers.py) -> check projects -> build the envelopes
(one organization each) -> publish and wait for the broker's acknowledgement. Nothing here knows
HTTP: errors are shared.errors exceptions that api.py maps to status codes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

import msgspec

from services.ingest import metrics
from services.ingest.customers import Directory, resolve_organizations, usage_organization
from services.ingest.keycache import (
    Admission,
    KeyCache,
    KeyUsageTally,
    ProjectCache,
    ProjectInfo,
)
from services.ingest.metercache import MeterCache
from services.ingest.publisher import EventPublisher
from services.ingest.ratelimit import RateLimiter
from services.ingest.schemas import (
    EventIn,
    UsageOut,
    UsageRowOut,
    batch_decoder,
    event_decoder,
    generic_decoder,
)
from shared.apikeys import VerifiedKey
from shared.errors import Forbidden, InvalidInput, MeterlineError, RateLimited, Unauthenticated
from shared.events import (
    ENVELOPE_VERSION,
    MAX_EVENTS_PER_REQUEST,
    MAX_PROPERTY_KEY,
    METRIC_RE,
    Envelope,
    UsageEvent,
    decimal_text,
    encode_envelope,
    quantity_from_json,
    timestamp_from_text,
    unstorable_text,
    validate_event,
)
from shared.logs import log_event
from shared.meters import MeterDefinition, check_meter_properties
from shared.models import USAGE_READER_ROLES, Role
from shared.settings import Settings
from shared.usage import Granularity, UsageRow, UsageScope

logger = logging.getLogger("meterline.ingest")

UNAUTHENTICATED_MESSAGE = "missing, unknown, revoked or expired API key"
# One Kafka message stays under the broker's default 1 MB message.max.bytes; a larger envelope is
# split into several envelopes of the same organization (same key, so same partition and order).
MAX_MESSAGE_BYTES = 900_000
MAX_USAGE_RANGE = timedelta(days=400)


def parse_bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """The validated events of one request and the customer each names (None: none)."""

    events: list[UsageEvent]
    customers: list[str | None]


def parse_events(
    body: bytes,
    *,
    now: datetime,
    horizon: timedelta,
    max_future: timedelta,
    default_project: uuid.UUID | None = None,
) -> list[UsageEvent]:
    """Every event of a request body, validated, or InvalidInput listing each bad event by index."""
    return parse_request(
        body, now=now, horizon=horizon, max_future=max_future, default_project=default_project
    ).events


def parse_request(
    body: bytes,
    *,
    now: datetime,
    horizon: timedelta,
    max_future: timedelta,
    default_project: uuid.UUID | None = None,
) -> ParsedRequest:
    """Every event of a request body, validated, with the customer each names, or InvalidInput
    listing each bad event by index.

    The fast path decodes in C into typed structs and checks only what needs values; whatever it
    does not accept is handed to shared.events.validate_event, the authority on the rules, which
    either accepts it too or names every problem.
    """
    earliest, latest = now - horizon, now + max_future
    fast = _decode_fast(body)
    if fast is not None:
        # JSON can spell a NUL or a surrogate only as a \u escape: without one, no text of the
        # body needs the storability check.
        events = _accept_fast(fast, now, earliest, latest, default_project, b"\\u" in body)
        if events is not None:
            return events
    return _parse_slow(
        body, now=now, horizon=horizon, max_future=max_future, default_project=default_project
    )


def _decode_fast(body: bytes) -> list[EventIn] | None:
    try:
        return batch_decoder.decode(body).events
    except msgspec.MsgspecError:
        pass
    try:
        return [event_decoder.decode(body)]
    except msgspec.MsgspecError:
        return None


def _accept_fast(
    decoded: list[EventIn],
    now: datetime,
    earliest: datetime,
    latest: datetime,
    default_project: uuid.UUID | None,
    escaped: bool,
) -> ParsedRequest | None:
    events = []
    for item in decoded:
        quantity = quantity_from_json(bytes(item.quantity))
        if quantity is None:
            return None
        if escaped and _text_unstorable(item):
            return None
        defaulted = item.timestamp is None
        if item.timestamp is None:
            timestamp = now
        else:
            try:
                timestamp = timestamp_from_text(item.timestamp)
            except ValueError:
                return None
            if timestamp > latest or timestamp < earliest:
                return None
        events.append(
            UsageEvent(
                id=item.id,
                metric=item.metric,
                quantity=quantity,
                timestamp=timestamp,
                project_id=uuid.UUID(item.project_id) if item.project_id else default_project,
                properties=item.properties or {},
                timestamp_defaulted=defaulted,
            )
        )
    return ParsedRequest(events, [item.customer for item in decoded])


def _text_unstorable(item: EventIn) -> bool:
    if unstorable_text(item.id) or (item.customer and unstorable_text(item.customer)):
        return True
    return any(
        unstorable_text(name) or unstorable_text(value)
        for name, value in (item.properties or {}).items()
    )


def _parse_slow(
    body: bytes,
    *,
    now: datetime,
    horizon: timedelta,
    max_future: timedelta,
    default_project: uuid.UUID | None,
) -> ParsedRequest:
    try:
        raw = generic_decoder.decode(body)
    except msgspec.MsgspecError:
        raw = _decode_with_surrogates(body)
    except RecursionError:
        raise InvalidInput("body is nested too deeply") from None
    items = _event_items(raw)
    events: list[UsageEvent] = []
    problems: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        result = validate_event(item, now=now, horizon=horizon, max_future=max_future)
        if isinstance(result, list):
            problems.append({"index": index, "reason": "; ".join(result)})
        else:
            if result.project_id is None and default_project is not None:
                result = msgspec.structs.replace(result, project_id=default_project)
            events.append(result)
    if problems:
        metrics.EVENTS_REJECTED.inc(len(items))
        raise InvalidInput(
            f"{len(problems)} of {len(items)} events are invalid; nothing was accepted",
            details=problems,
        )
    # Each item is a valid event here, so an object whose customer is a string or absent.
    return ParsedRequest(events, [item.get("customer") for item in items])


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _decode_with_surrogates(body: bytes) -> Any:
    """msgspec refuses a lone surrogate escape as malformed JSON; Python's json module reads
    it, so that validate_event can name the field that holds it. Anything else is not JSON."""
    if not _SURROGATE_ESCAPE.search(body):
        raise InvalidInput("body is not valid JSON")
    try:
        return json.loads(body, parse_float=Decimal, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise InvalidInput("body is not valid JSON") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _event_items(raw: Any) -> list[Any]:
    if not (isinstance(raw, dict) and "events" in raw):
        return [raw]
    extra = raw.keys() - {"events"}
    if extra:
        raise InvalidInput(
            'a batch is {"events": [...]} with no other field; '
            f"unknown field(s): {', '.join(sorted(map(str, extra)))}"
        )
    items = raw["events"]
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_EVENTS_PER_REQUEST:
        raise InvalidInput(f"events must be a list of 1 to {MAX_EVENTS_PER_REQUEST} events")
    return items


def check_projects(
    events: Sequence[UsageEvent],
    key: VerifiedKey,
    projects: Mapping[uuid.UUID, ProjectInfo],
    organizations: Sequence[uuid.UUID] | None = None,
) -> None:
    """Forbidden unless every event's project belongs to the event's organization (the key's,
    or for a platform key the one its customer names) and, for a project-scoped key, is that
    project. Unknown projects read the same as foreign ones."""
    problems = []
    for index, event in enumerate(events):
        project_id = event.project_id
        if project_id is None:
            continue
        if key.project_id is not None:
            if project_id != key.project_id:
                reason = "this key may only write its own project"
                problems.append({"index": index, "reason": reason})
            # The key's own project was checked when the key was made; archiving revokes it.
            continue
        info = projects.get(project_id)
        organization_id = key.organization_id if organizations is None else organizations[index]
        if info is None or info.organization_id != organization_id:
            problems.append(
                {"index": index, "reason": f"project {project_id} is not in this organization"}
            )
        elif info.archived:
            problems.append({"index": index, "reason": f"project {project_id} is archived"})
    if problems:
        raise Forbidden("the key may not write to some of these projects", details=problems)


def check_meters(events: Sequence[UsageEvent], meters: Mapping[str, MeterDefinition]) -> None:
    """InvalidInput (422) naming each event of a metered metric that lacks a property its meter
    groups by or counts; the batch is all or nothing, as for any other invalid event."""
    problems = check_meter_properties(((e.metric, e.properties) for e in events), meters)
    if problems:
        raise InvalidInput(
            f"{len(problems)} of {len(events)} events are invalid; nothing was accepted",
            details=problems,
        )


def build_envelopes(
    key: VerifiedKey,
    events: list[UsageEvent],
    received_at: datetime,
    organization_id: uuid.UUID | None = None,
) -> list[bytes]:
    """The encoded envelopes of one organization's events of a request (default: the key's):
    one message, or several if it would be too large."""
    organization = organization_id or key.organization_id
    assert organization is not None, "a platform key's events name their organization"
    value = encode_envelope(
        Envelope(
            v=ENVELOPE_VERSION,
            organization_id=organization,
            api_key_id=key.id,
            received_at=received_at,
            events=events,
        )
    )
    if len(value) <= MAX_MESSAGE_BYTES or len(events) == 1:
        return [value]
    half = len(events) // 2
    return build_envelopes(key, events[:half], received_at, organization) + build_envelopes(
        key, events[half:], received_at, organization
    )


def _only(organizations: Sequence[uuid.UUID]) -> uuid.UUID | None:
    """The one organization of a request's events, or None when they name several."""
    first = organizations[0]
    return first if all(o == first for o in organizations) else None


def by_organization(
    events: Sequence[UsageEvent], organizations: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[UsageEvent]]:
    """The events of a request grouped by organization, each group in request order: an
    envelope holds one organization's events, keyed by it (its partition, its order)."""
    groups: dict[uuid.UUID, list[UsageEvent]] = {}
    for event, organization_id in zip(events, organizations, strict=True):
        groups.setdefault(organization_id, []).append(event)
    return groups


class UsageReader(Protocol):
    async def __call__(
        self,
        scope: UsageScope,
        *,
        start: datetime,
        end: datetime,
        metric: str | None,
        group_by: Sequence[str],
        filters: Mapping[str, str],
        granularity: Granularity,
    ) -> list[UsageRow]: ...


MemberRole = Callable[[uuid.UUID, uuid.UUID], Awaitable[Role | None]]


def usage_scope(
    key: VerifiedKey, role: Role | None, organization_id: uuid.UUID | None = None
) -> UsageScope:
    """What a key may read (DESIGN.md 4, README "Ingest API"): an organization key, its
    organization; a project key, its project; a user key, what its member's role may see now:
    owners, admins and billing the organization, a plain member only its own keys' usage. A
    user key that is also project-scoped keeps both limits. A platform key, the organization
    it names (`organization_id`, resolved from the customer)."""
    if key.platform:
        assert organization_id is not None
        return UsageScope(organization_id)
    assert key.organization_id is not None
    if key.user_id is None:
        return UsageScope(key.organization_id, project_id=key.project_id)
    if role is None:
        raise Forbidden("this key's user is no longer a member of the organization")
    return UsageScope(
        key.organization_id,
        project_id=key.project_id,
        keys_of_user=None if role in USAGE_READER_ROLES else key.user_id,
    )


@dataclass(frozen=True, slots=True)
class Limits:
    horizon: timedelta
    max_future: timedelta
    publish_timeout: float


class KeyOverLimit(RateLimited):
    """A verified key over its own rate limit: answered 429 like any, but its client is no
    stranger (the front door does not put its connection in the strangers' line)."""


class IngestService:
    """One per worker process: the caches, the rate limiter and the publisher it decides with."""

    def __init__(
        self,
        settings: Settings,
        *,
        keys: KeyCache,
        projects: ProjectCache,
        limiter: RateLimiter,
        tally: KeyUsageTally,
        publisher: EventPublisher,
        usage: UsageReader,
        meters: MeterCache | None = None,
        member_role: MemberRole,
        customers: Directory,
        subscriptions: Directory,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.topic = settings.events_topic
        self.limits = Limits(
            horizon=settings.lateness_horizon,
            max_future=timedelta(seconds=settings.max_future_seconds),
            publish_timeout=settings.ingest_publish_timeout_seconds,
        )
        self.keys = keys
        self.projects = projects
        self.limiter = limiter
        self.tally = tally
        self.publisher = publisher
        self.usage_reader = usage
        self.meters = meters
        self.member_role = member_role
        self.customers = customers
        self.subscriptions = subscriptions
        self.clock = clock

    async def authenticate(
        self,
        authorization: str | None,
        client: str | None = None,
        admission: Admission | None = None,
    ) -> VerifiedKey:
        """The verified key of a request, counted against its rate limit. `client` is the
        caller's address: failed authentications are limited per address (keycache.py).
        `admission`: what `screen` took for this request."""
        plaintext = parse_bearer(authorization)
        now = self.clock()
        key = await self.keys.get(plaintext, now, client, admission) if plaintext else None
        if key is None:
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        self.tally.record(key.id, now)
        wait = self.limiter.acquire(key.id)
        if wait > 0:
            raise KeyOverLimit("over this key's rate limit", retry_after=wait)
        return key

    def screen(self, authorization: str | None, client: str | None) -> MeterlineError | Admission:
        """The refusal `authenticate` would give without waiting on anything (a missing,
        malformed or remembered unknown key; an address or strangers' budget over its limit),
        taking nothing; else what was taken to let it through, for `authenticate`
        (KeyCache.screen)."""
        plaintext = parse_bearer(authorization)
        screened = self.keys.screen(plaintext, client) if plaintext else "unknown"
        if screened == "unknown":
            return Unauthenticated(UNAUTHENTICATED_MESSAGE)
        return screened

    async def ingest(
        self,
        key: VerifiedKey,
        body: bytes,
        *,
        directory: Directory | None = None,
        always_named: bool = False,
    ) -> int:
        """Validate every event of `body`, publish them, and return how many the broker holds.

        `directory` is where the events' customer names are looked up (default: organizations);
        `always_named` says the wire shape names a customer in every event (customers.py)."""
        received_at = self.clock()
        limits = self.limits
        parsed = parse_request(
            body,
            now=received_at,
            horizon=limits.horizon,
            max_future=limits.max_future,
            default_project=key.project_id,
        )
        events = parsed.events
        try:
            if self.meters is not None:
                check_meters(events, await self.meters.get())
            organizations = await resolve_organizations(
                key, parsed.customers, directory or self.customers, always_named=always_named
            )
            project_ids = {e.project_id for e in events if e.project_id is not None}
            if project_ids and not (key.project_id is not None and project_ids == {key.project_id}):
                known = await self.projects.get_many(project_ids) if key.project_id is None else {}
                check_projects(events, key, known, organizations)
        except (Forbidden, InvalidInput):
            metrics.EVENTS_REJECTED.inc(len(events))
            raise
        started = time.perf_counter()
        only = key.organization_id if organizations is None else _only(organizations)
        if only is not None:
            messages = await self._publish(only, key, events, received_at)
        else:
            assert organizations is not None
            # Every organization's envelopes are published, or the request is answered 503 and
            # retried: a group the broker already holds is then a resend the ledger counts once.
            groups = by_organization(events, organizations)
            published = await asyncio.gather(
                *(
                    self._publish(organization_id, key, group, received_at)
                    for organization_id, group in groups.items()
                )
            )
            messages = sum(published)
        metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)
        metrics.EVENTS_ACCEPTED.inc(len(events))
        log_event(logger, "events_published", logging.DEBUG, count=len(events), messages=messages)
        return len(events)

    async def _publish(
        self,
        organization_id: uuid.UUID,
        key: VerifiedKey,
        events: list[UsageEvent],
        received_at: datetime,
    ) -> int:
        values = build_envelopes(key, events, received_at, organization_id)
        await self.publisher.publish_all(
            self.topic,
            str(organization_id).encode(),
            values,
            int(received_at.timestamp() * 1000),
            wait_seconds=self.limits.publish_timeout,
        )
        return len(values)

    async def usage(
        self,
        key: VerifiedKey,
        *,
        start: datetime | None,
        end: datetime | None,
        metric: str | None,
        group_by: Sequence[str] = (),
        granularity: str,
        customer: str | None = None,
        filters: Mapping[str, str] | None = None,
    ) -> UsageOut:
        """The usage the key may see (usage_scope) in [start, end) (default: the last 24 hours),
        grouped by any of project, api_key, metric and a metered metric's dimensions, filtered
        by dimension values (shared.usage_reads); a platform key reads the organization
        `customer` names."""
        problems = []
        for name in group_by:
            if not name or len(name) > MAX_PROPERTY_KEY:
                problems.append(
                    "group_by: project, api_key, metric or a dimension of the metric's meter"
                )
        if len(set(group_by)) != len(group_by):
            problems.append("group_by: names a group more than once")
        for name, value in (filters or {}).items():
            if not name or len(name) > MAX_PROPERTY_KEY or unstorable_text(name + value):
                problems.append(f"filter[{name}]: a dimension name and a property value")
        if any(unstorable_text(name) for name in group_by):
            problems.append("group_by: a name holds text that is no property name")
        if granularity not in ("hour", "day", "month"):
            problems.append("granularity: one of hour, day, month")
        if metric is not None and not METRIC_RE.match(metric):
            problems.append("metric: must match ^[a-z][a-z0-9_.-]{0,63}$")
        end = end or self.clock()
        try:
            start = start or end - timedelta(days=1)
        except OverflowError:
            raise InvalidInput("invalid usage query", details=["to: out of range"]) from None
        if start >= end:
            problems.append("from: must be before to")
        elif end - start > MAX_USAGE_RANGE:
            problems.append(f"from/to: at most {MAX_USAGE_RANGE.days} days apart")
        if problems:
            raise InvalidInput("invalid usage query", details=problems)
        organization_id = await usage_organization(key, customer, self.customers)
        role = None if key.user_id is None else await self.member_role(organization_id, key.user_id)
        rows = await self.usage_reader(
            usage_scope(key, role, organization_id),
            start=start,
            end=end,
            metric=metric,
            group_by=group_by,
            filters=filters or {},
            granularity=granularity,  # type: ignore[arg-type]
        )
        return UsageOut(
            start=start,
            end=end,
            granularity=granularity,
            data=[
                UsageRowOut(
                    start=row.start,
                    metric=row.metric,
                    quantity=decimal_text(row.quantity),
                    event_count=row.event_count,
                    project_id=row.project_id if "project" in group_by else msgspec.UNSET,
                    api_key_id=row.api_key_id if "api_key" in group_by else msgspec.UNSET,
                    dimensions=msgspec.UNSET if row.dimensions is None else row.dimensions,
                )
                for row in rows
            ],
        )

    async def aclose(self) -> None:
        await self.tally.flush()
        await self.publisher.close()
