"""The admin API's OpenAPI 3.1 document, built from the route modules' Operations (so every
route is documented and nothing documented is missing)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.console.routing import API_PREFIX, Operation
from services.console.schemas import SCHEMAS

_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_ERRORS = {
    "401": {"description": "No, unknown or revoked operator token or session", **_ERROR},
    "403": {"description": "A viewer asked for a change, or a session change lacks CSRF", **_ERROR},
    "404": {"description": "Not found", **_ERROR},
    "422": {"description": "Invalid parameters or body; details list each problem", **_ERROR},
}


def _operation(op: Operation) -> dict[str, Any]:
    parameters = [
        {
            "name": p.name,
            "in": p.location,
            "required": p.required or p.location == "path",
            "description": p.description,
            "schema": p.schema(),
            **({"style": "deepObject", "explode": True} if p.type == "object" else {}),
        }
        for p in op.params
    ]
    found: dict[str, Any] = {
        "operationId": op.name,
        "summary": op.summary,
        "tags": [op.tag],
        "parameters": parameters,
        "responses": {
            "200": {
                "description": "OK",
                "content": {"application/json": {"schema": op.response}},
            },
            **{code: response for code, response in _ERRORS.items() if code != "403" or op.change},
        },
    }
    if op.description:
        found["description"] = op.description
    if op.change:
        found["description"] = (found.get("description", "") + " Admin operators only; "
                                "audited.").strip()  # fmt: skip
        found["responses"]["409"] = {"description": "Conflicts with the current state", **_ERROR}
    if op.body is not None:
        found["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": op.body}},
        }
        found["responses"]["413"] = {"description": "Body larger than 1 MiB", **_ERROR}
    return found


def openapi_document(operations: Sequence[Operation]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(API_PREFIX + op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Meterline admin API",
            "version": "1",
            "description": "What the Meterline console does, for scripts: organizations, keys, "
            "plans, usage, billing runs, reconciliation mismatches, dead letters, replay runs, "
            "pipeline health and the audit log. Authenticate with `Authorization: Bearer "
            "<operator token>` (`meterline operators create NAME --role admin|viewer`).",
        },
        "servers": [{"url": "/"}],
        "security": [{"operatorToken": []}],
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "operatorToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An operator token, mlop_...",
                }
            },
        },
    }
