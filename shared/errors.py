"""The one error hierarchy: a stable machine code, a message for a person, an HTTP status."""

from __future__ import annotations

from typing import Any


class MeterlineError(Exception):
    code = "error"
    status = 500

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return {"error": body}


class ConfigurationError(MeterlineError):
    code = "configuration_error"


class DatabaseUnavailable(MeterlineError):
    code = "database_unavailable"
    status = 503


class BrokerUnavailable(MeterlineError):
    code = "broker_unavailable"
    status = 503


class NotFound(MeterlineError):
    code = "not_found"
    status = 404


class Conflict(MeterlineError):
    code = "conflict"
    status = 409


class InvalidInput(MeterlineError):
    code = "invalid"
    status = 422


class Unauthenticated(MeterlineError):
    code = "unauthenticated"
    status = 401


class Forbidden(MeterlineError):
    code = "forbidden"
    status = 403


class RateLimited(MeterlineError):
    code = "rate_limited"
    status = 429

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PayloadTooLarge(MeterlineError):
    code = "payload_too_large"
    status = 413


class UnsupportedMediaType(MeterlineError):
    code = "unsupported_media_type"
    status = 415
