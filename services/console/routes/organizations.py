"""Organizations: list and search, one organization with its members, projects and keys, and
revoking a key (ingest refuses it within the key cache bound)."""

from __future__ import annotations

from typing import Any

from services.console.routing import PAGING, Call, Operation, Page, Param, Redirect, Render
from services.console.schemas import (
    Document,
    key_document,
    member_document,
    obj,
    organization_document,
    page_of,
    paged,
    project_document,
)
from shared.apikeys import find_api_key, list_api_keys, revoke_api_key
from shared.audit import record_change
from shared.models import ApiKey
from shared.organizations import (
    find_organization,
    list_members,
    list_projects,
    search_organizations,
)

SEARCH = Param("q", "Part of a slug or name, or an exact id or Stripe customer id.")
ORGANIZATION = Param("organization", "Organization id or slug.", location="path", required=True)
KEY = Param("key", "API key id or prefix.", location="path", required=True)


def organizations(call: Call) -> Document:
    limit, offset = call.arg("limit"), call.arg("offset")
    found = search_organizations(call.session, query=call.arg("q"), limit=limit, offset=offset)
    return paged(
        [organization_document(o) for o in found.organizations], found.total, limit, offset
    )


def organization(call: Call) -> Document:
    found = find_organization(call.session, call.path["organization"])
    return {
        "organization": organization_document(found),
        "members": [member_document(u, r) for u, r in list_members(call.session, found.id)],
        "projects": [project_document(p) for p in list_projects(call.session, found.id)],
        "api_keys": [
            key_document(k, call.now) for k in list_api_keys(call.session, found.id, actor_id=None)
        ],
    }


def revoke_key(call: Call) -> ApiKey:
    """Revoke the key (idempotent) and audit it: the console acts as the operator, not a member."""
    key = find_api_key(call.session, call.path["key"])
    already = key.revoked_at is not None
    revoke_api_key(call.session, key.id, actor_id=None, now=call.now)
    record_change(
        call.session,
        call.principal.actor,
        "api_key.revoke",
        target_type="api_key",
        target_id=key.id,
        details={
            "prefix": key.prefix,
            # A platform key belongs to no organization.
            "organization_id": str(key.organization_id) if key.organization_id else None,
            "platform": key.platform,
            "already_revoked": already,
        },
    )
    return key


operations = [
    Operation(
        "GET",
        "/organizations",
        "listOrganizations",
        "List or search organizations",
        "organizations",
        organizations,
        page_of("Organization"),
        params=(SEARCH, *PAGING),
    ),
    Operation(
        "GET",
        "/organizations/{organization}",
        "getOrganization",
        "An organization with its members, projects and API keys (by prefix)",
        "organizations",
        organization,
        obj(
            {
                "organization": {"$ref": "#/components/schemas/Organization"},
                "members": {"type": "array", "items": {"$ref": "#/components/schemas/Member"}},
                "projects": {"type": "array", "items": {"$ref": "#/components/schemas/Project"}},
                "api_keys": {"type": "array", "items": {"$ref": "#/components/schemas/ApiKey"}},
            }
        ),
        params=(ORGANIZATION,),
    ),
    Operation(
        "POST",
        "/api-keys/{key}/revoke",
        "revokeApiKey",
        "Revoke an API key",
        "organizations",
        lambda call: key_document(revoke_key(call), call.now),
        {"$ref": "#/components/schemas/ApiKey"},
        params=(KEY,),
        change=True,
        description="Idempotent. Ingest refuses the key within its key cache bound "
        "(METERLINE_KEY_CACHE_TTL_SECONDS, at most 5 s).",
    ),
]


def _list_page(call: Call) -> Render:
    limit = 50
    offset = (call.arg("page") - 1) * limit
    found = search_organizations(call.session, query=call.arg("q"), limit=limit, offset=offset)
    context: dict[str, Any] = {
        "organizations": found.organizations,
        "total": found.total,
        "q": call.arg("q") or "",
        "page": call.arg("page"),
        "pages": max(1, -(-found.total // limit)),
    }
    return Render("organizations.html", context)


def _detail_page(call: Call) -> Render:
    document = organization(call)
    slugs = {p["id"]: p["slug"] for p in document["projects"]}
    return Render("organization.html", {**document, "project_slugs": slugs})


def _revoke_page(call: Call) -> Redirect:
    key = revoke_key(call)
    back = f"/organizations/{key.organization_id}" if key.organization_id else "/organizations"
    return Redirect(back, f"Revoked key {key.prefix}.")


PAGE = Param("page", "Page number.", "integer", minimum=1, maximum=10**6, default=1)

pages = [
    Page("GET", "/organizations", _list_page, params=(SEARCH, PAGE)),
    Page("GET", "/organizations/{organization}", _detail_page),
    Page("POST", "/api-keys/{key}/revoke", _revoke_page),
]
