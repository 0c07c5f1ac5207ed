"""Which organization each event of a request belongs to: the key's own, or the customer a
platform key names (README "Platform keys").

A customer name is looked up in a directory: organizations (an organization's external_id, else
its id) for /v1/events and OpenMeter's subject, subscriptions (a subscription's external_id) for
Lago's external_subscription_id. Answers are cached for the key cache ttl, so a deleted
organization is refused within the same bound as a revoked key.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from services.ingest.keycache import FreshCache
from shared.apikeys import VerifiedKey
from shared.errors import Forbidden, InvalidInput
from shared.events import customer_problems

#: A directory: customer names -> the organization each names (unknown names left out).
Directory = FreshCache[str, uuid.UUID]


class UnknownCustomer(InvalidInput):
    code = "unknown_customer"


async def resolve_organizations(
    key: VerifiedKey,
    names: Sequence[str | None],
    directory: Directory,
    *,
    always_named: bool = False,
) -> list[uuid.UUID] | None:
    """The organization of each event, in order, from the customer each names (None: none);
    None when every event is the key's own organization's (the common case, kept cheap).

    A platform key must name a known customer for every event. Any other key writes its own
    organization: on /v1/events it may not name a customer at all (Forbidden); where the wire
    shape always names one (`always_named`: OpenMeter's subject, Lago's subscription), the name
    must be its own organization's."""
    if key.platform:
        return await _platform_organizations(names, directory)
    assert key.organization_id is not None
    own = key.organization_id
    named = [(index, name) for index, name in enumerate(names) if name is not None]
    if not named:
        return None
    if not always_named:
        raise Forbidden(
            "only a platform key may name a customer",
            details=[
                {"index": i, "reason": "customer: this key writes its own organization"}
                for i, _ in named
            ],
        )
    found = await directory.get_many({name for _, name in named})
    foreign = [
        {"index": i, "reason": f"customer {name!r} is not this key's organization"}
        for i, name in named
        if found.get(name) != own
    ]
    if foreign:
        raise Forbidden("this key may only write its own organization", details=foreign)
    return None


async def _platform_organizations(
    names: Sequence[str | None], directory: Directory
) -> list[uuid.UUID]:
    missing = [
        {"index": i, "reason": "customer: required with a platform key"}
        for i, name in enumerate(names)
        if name is None
    ]
    if missing:
        raise InvalidInput(
            f"{len(missing)} of {len(names)} events name no customer; nothing was accepted",
            details=missing,
        )
    found = await directory.get_many({name for name in names if name is not None})
    unknown: list[dict[str, Any]] = [
        {"index": i, "reason": f"unknown customer {name!r}"}
        for i, name in enumerate(names)
        if name not in found
    ]
    if unknown:
        shown = sorted({str(name) for name in names if name not in found})
        raise UnknownCustomer(
            f"unknown customer(s): {', '.join(map(repr, shown[:10]))}; nothing was accepted",
            details=unknown,
        )
    return [found[name] for name in names if name is not None]


async def usage_organization(
    key: VerifiedKey, customer: str | None, directory: Directory
) -> uuid.UUID:
    """The organization a usage query reads: a platform key's named customer, or the key's own
    (any other key naming a customer is Forbidden)."""
    if not key.platform:
        if customer is not None:
            raise Forbidden("only a platform key may name a customer")
        assert key.organization_id is not None
        return key.organization_id
    if customer is None:
        raise InvalidInput(
            "invalid usage query", details=["customer: required with a platform key"]
        )
    problems = customer_problems(customer)
    if problems:
        raise InvalidInput("invalid usage query", details=problems)
    found = await directory.get_many({customer})
    if customer not in found:
        raise UnknownCustomer(f"unknown customer {customer!r}")
    return found[customer]
