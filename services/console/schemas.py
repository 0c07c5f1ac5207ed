"""Wire shapes of the admin API: the documents handlers return (built from the service layer's
rows and views) and their JSON schemas, which the OpenAPI document and the pages share."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from services.aggregator.dead_letters import DeadLetterView, PartitionLetters
from services.billing.mismatches import MismatchView
from shared.apikeys import key_state
from shared.models import (
    ApiKey,
    AuditEntry,
    BillingRun,
    Organization,
    Project,
    ReplayRun,
    Role,
    User,
)

Document = dict[str, Any]


def _nullable(kind: str, fmt: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": [kind, "null"]}
    if fmt:
        schema["format"] = fmt
    return schema


_ID = {"type": "string", "format": "uuid"}
_TIME = {"type": "string", "format": "date-time"}
_DECIMAL = {"type": "string", "description": "a decimal number, exact"}


def obj(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties)}


def page_of(item: str) -> dict[str, Any]:
    return obj(
        {
            "total": {"type": "integer"},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
            "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}},
        }
    )


def paged(items: list[Document], total: int, limit: int, offset: int) -> Document:
    return {"total": total, "limit": limit, "offset": offset, "items": items}


SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": obj(
        {
            "error": obj(
                {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "details": {},
                }
            )
        }
    ),
    "Operator": obj(
        {
            "id": _ID,
            "name": {"type": "string"},
            "role": {"type": "string", "enum": ["admin", "viewer"]},
            "can_change": {"type": "boolean"},
        }
    ),
    "Organization": obj(
        {
            "id": _ID,
            "slug": {"type": "string"},
            "name": {"type": "string"},
            "stripe_customer_id": _nullable("string"),
            "created_at": _TIME,
        }
    ),
    "Member": obj(
        {
            "user_id": _ID,
            "email": {"type": "string"},
            "name": _nullable("string"),
            "role": {"type": "string", "enum": [str(r) for r in Role]},
        }
    ),
    "Project": obj(
        {
            "id": _ID,
            "slug": {"type": "string"},
            "name": {"type": "string"},
            "archived_at": _nullable("string", "date-time"),
        }
    ),
    "ApiKey": obj(
        {
            "id": _ID,
            "prefix": {"type": "string"},
            "name": {"type": "string"},
            "project_id": _nullable("string", "uuid"),
            "user_id": _nullable("string", "uuid"),
            "state": {"type": "string", "enum": ["active", "revoked", "expired"]},
            "last_used_at": _nullable("string", "date-time"),
            "usage_count": {"type": "integer"},
            "expires_at": _nullable("string", "date-time"),
            "revoked_at": _nullable("string", "date-time"),
            "created_at": _TIME,
        }
    ),
    "AuditEntry": obj(
        {
            "id": _ID,
            "at": _TIME,
            "actor": {"type": "string"},
            "operator_id": _nullable("string", "uuid"),
            "action": {"type": "string"},
            "target_type": {"type": "string"},
            "target_id": _nullable("string"),
            "details": {"type": "object"},
        }
    ),
    "BillingRun": obj(
        {
            "id": _ID,
            "as_of": _TIME,
            "dry_run": {"type": "boolean"},
            "status": {"type": "string"},
            "started_at": _TIME,
            "finished_at": _nullable("string", "date-time"),
            "subscriptions": {"type": "integer"},
            "invoices_changed": {"type": "integer"},
            "reported": {"type": "integer"},
            "mismatches": {"type": "integer"},
            "error": _nullable("string"),
        }
    ),
    "Mismatch": obj(
        {
            "id": _ID,
            "run_id": _nullable("string", "uuid"),
            "subscription_id": _ID,
            "organization_id": _ID,
            "organization_slug": {"type": "string"},
            "kind": {"type": "string"},
            "metric": _nullable("string"),
            "period_start": _nullable("string", "date-time"),
            "ours": {"type": "string"},
            "theirs": {"type": "string"},
            "amount": _nullable("string"),
            "resolved": {"type": "boolean"},
            "resolution": _nullable("string"),
            "resolved_at": _nullable("string", "date-time"),
            "resolved_by": _nullable("string"),
            "resolution_note": _nullable("string"),
            "found_at": _TIME,
            "updated_at": _TIME,
        }
    ),
    "DeadLetter": obj(
        {
            "reference": {"type": "string", "description": "<partition>:<offset> in the DLQ"},
            "partition": {"type": "integer"},
            "offset": {"type": "integer"},
            "code": {"type": "string"},
            "reason": {"type": "string"},
            "retryable": {"type": "boolean"},
            "failed_at": _nullable("string", "date-time"),
            "source": obj(
                {
                    "topic": _nullable("string"),
                    "partition": _nullable("integer"),
                    "offset": _nullable("integer"),
                }
            ),
            "organization_id": _nullable("string", "uuid"),
            "event_ids": {"type": "array", "items": {"type": "string"}},
            "event_count": {"type": "integer"},
        }
    ),
    "ReplayRun": obj(
        {
            "id": _ID,
            "from": _TIME,
            "to": _TIME,
            "organization_id": _nullable("string", "uuid"),
            "metric": _nullable("string"),
            "dry_run": {"type": "boolean"},
            "status": {"type": "string"},
            "events_read": {"type": "integer"},
            "windows_changed": {"type": "integer"},
            "changes": {"type": "array", "items": {"type": "object"}},
            "finished_at": _nullable("string", "date-time"),
        }
    ),
    "UsageRow": obj(
        {
            "start": _TIME,
            "metric": {"type": "string"},
            "project_id": _nullable("string", "uuid"),
            "api_key_id": _nullable("string", "uuid"),
            "dimensions": {
                "type": ["object", "null"],
                "additionalProperties": {"type": ["string", "null"]},
                "description": "grouped by a dimension: the group's value (null: not carried)",
            },
            "quantity": _DECIMAL,
            "event_count": {"type": "integer"},
        }
    ),
}


def operator_document(principal_operator: Any) -> Document:
    return {
        "id": principal_operator.id,
        "name": principal_operator.name,
        "role": str(principal_operator.role),
        "can_change": principal_operator.can_change,
    }


def organization_document(organization: Organization) -> Document:
    return {
        "id": organization.id,
        "slug": organization.slug,
        "name": organization.name,
        "stripe_customer_id": organization.stripe_customer_id,
        "created_at": organization.created_at,
    }


def member_document(user: User, role: Role) -> Document:
    return {"user_id": user.id, "email": user.email, "name": user.name, "role": str(role)}


def project_document(project: Project) -> Document:
    return {
        "id": project.id,
        "slug": project.slug,
        "name": project.name,
        "archived_at": project.archived_at,
    }


def key_document(key: ApiKey, now: datetime) -> Document:
    return {
        "id": key.id,
        "prefix": key.prefix,
        "name": key.name,
        "project_id": key.project_id,
        "user_id": key.user_id,
        "state": key_state(key, now),
        "last_used_at": key.last_used_at,
        "usage_count": key.usage_count,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "created_at": key.created_at,
    }


def audit_document(entry: AuditEntry) -> Document:
    return {
        "id": entry.id,
        "at": entry.created_at,
        "actor": entry.actor,
        "operator_id": entry.operator_id,
        "action": entry.action,
        "target_type": entry.target_type,
        "target_id": entry.target_id,
        "details": entry.details,
    }


def billing_run_document(run: BillingRun) -> Document:
    return {
        "id": run.id,
        "as_of": run.as_of,
        "dry_run": run.dry_run,
        "status": run.status,
        "started_at": run.created_at,
        "finished_at": run.finished_at,
        "subscriptions": run.subscriptions,
        "invoices_changed": run.invoices_changed,
        "reported": run.reported,
        "mismatches": run.mismatches,
        "error": run.error,
    }


def mismatch_document(view: MismatchView) -> Document:
    return {
        "id": view.id,
        "run_id": view.run_id,
        "subscription_id": view.subscription_id,
        "organization_id": view.organization_id,
        "organization_slug": view.organization_slug,
        "kind": view.kind,
        "metric": view.metric,
        "period_start": view.period_start,
        "ours": view.ours,
        "theirs": view.theirs,
        "amount": view.amount,
        "resolved": view.resolved,
        "resolution": view.resolution,
        "resolved_at": view.resolved_at,
        "resolved_by": view.resolved_by,
        "resolution_note": view.resolution_note,
        "found_at": view.created_at,
        "updated_at": view.updated_at,
    }


def dead_letter_document(view: DeadLetterView) -> Document:
    return {
        "reference": view.reference,
        "partition": view.partition,
        "offset": view.offset,
        "code": view.code,
        "reason": view.reason,
        "retryable": view.retryable,
        "failed_at": view.failed_at,
        "source": {
            "topic": view.source_topic,
            "partition": view.source_partition,
            "offset": view.source_offset,
        },
        "organization_id": view.organization_id,
        "event_ids": list(view.event_ids),
        "event_count": view.event_count,
    }


def dlq_partition_document(partition: PartitionLetters) -> Document:
    return {
        "partition": partition.partition,
        "start": partition.start,
        "end": partition.end,
        "retained": partition.retained,
        "pending": partition.pending,
    }


def replay_run_document(run: ReplayRun) -> Document:
    return {
        "id": run.id,
        "from": run.range_start,
        "to": run.range_end,
        "organization_id": run.organization_id,
        "metric": run.metric,
        "dry_run": run.dry_run,
        "status": run.status,
        "events_read": run.events_read,
        "windows_changed": run.windows_changed,
        "changes": run.changes,
        "finished_at": run.finished_at,
    }
