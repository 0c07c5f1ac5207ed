"""Secrets never reach a log line, whatever logged them."""

from __future__ import annotations

import io
import json
import logging

from shared.keys import generate_key
from shared.logs import configure_logging, log_event, redact, register_secret


def test_redaction_runs_on_every_record() -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream)
    key = generate_key().plaintext
    pepper = "pepper-" + "z" * 30
    register_secret(pepper)
    logger = logging.getLogger("anything.third_party")
    logger.info("got key %s with pepper %s", key, pepper)
    log_event(
        logger, "events_published", authorization=f"Bearer {key}", url="postgresql://u:hunter2@h/db"
    )
    try:
        raise ValueError(f"bad {key}")
    except ValueError:
        logger.exception("failed")
    out = stream.getvalue()
    assert key not in out
    assert pepper not in out
    assert "hunter2" not in out
    assert out.count("[REDACTED]") >= 4
    for line in out.splitlines():
        json.loads(line)


def test_redact_keeps_ordinary_text() -> None:
    assert redact("batch_applied events=10 org=acme") == "batch_applied events=10 org=acme"
    assert "sk_test_abc123" not in redact("stripe key sk_test_abc123")
    assert "whsec_abc" not in redact("secret whsec_abcdef")


def test_an_operator_token_is_redacted_wherever_it_appears() -> None:
    from shared.keys import generate_operator_token

    token = generate_operator_token().plaintext
    assert token not in redact(f"login with {token} failed")
    assert token not in redact(f'{{"token": "{token}"}}')
