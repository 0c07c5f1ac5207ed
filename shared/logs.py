"""Structured logs: one JSON object per line, stable event names, secrets redacted on every record.

Call `log_event(logger, "events_published", count=3)`; the redaction filter runs on every record
whatever logged it (our code, uvicorn, faust, stripe), so a key pasted into a message never lands.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

# API keys, operator tokens, Stripe secrets, webhook secrets, bearer tokens and URL passwords.
_SECRET_PATTERNS = [
    re.compile(r"ml_(?:live|test)_[a-z2-7]{8}_[a-z2-7]{20,}"),
    re.compile(r"mlop_[a-z2-7]{8}_[a-z2-7]{20,}"),
    re.compile(r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{3,}"),
    re.compile(r"\bwhsec_[A-Za-z0-9+/=]{3,}"),
    re.compile(r"(?i)(bearer\s+)[^\s\"',]+"),
    re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)[^\"',}\s]+(?:\s+[^\"',}\s]+)?"),
    re.compile(r"(://[^:/@\s]+:)[^@/\s]+(@)"),
]
_extra_secrets: list[str] = []


def register_secret(value: str) -> None:
    """Redact this exact value too (the API key pepper, the Stripe key) wherever it appears."""
    if value and len(value) >= 6 and value not in _extra_secrets:
        _extra_secrets.append(value)


def redact(text: str) -> str:
    for secret in _extra_secrets:
        if secret in text:
            text = text.replace(secret, "[REDACTED]")
    for pattern in _SECRET_PATTERNS:
        if pattern.groups:
            text = pattern.sub(
                lambda m: (
                    (m.group(1) or "")
                    + "[REDACTED]"
                    + (m.group(2) if (m.lastindex or 0) >= 2 else "")
                ),
                text,
            )
        else:
            text = pattern.sub("[REDACTED]", text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg = redact(message)
        record.args = None
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {k: _redact_value(v) for k, v in fields.items()}
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def _redact_value(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            body.update(fields)
        if record.exc_text:
            body["exception"] = record.exc_text
        return json.dumps(body, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{record.levelname.lower():5} {record.name}: {record.getMessage()} {extra}".rstrip()
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


def configure_logging(level: str = "INFO", fmt: str = "json", stream: Any = None) -> None:
    """Install one handler on the root logger, with redaction and the chosen format (settings
    have refused any other level or format by name)."""
    if level.upper() not in logging.getLevelNamesMapping() or fmt not in ("json", "text"):
        raise ValueError(f"unknown log level {level!r} or format {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, event, extra={"fields": fields})
