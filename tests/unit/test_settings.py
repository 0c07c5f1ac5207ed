"""Settings: validated at start, one clear error per bad value."""

from __future__ import annotations

import pytest

from shared.errors import ConfigurationError
from shared.settings import load_settings


def test_plain_postgres_url_gets_psycopg_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_ENV_FILE", "/nonexistent")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@h:5/d")
    assert load_settings().database_url == "postgresql+psycopg://u:p@h:5/d"


def test_bad_values_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_ENV_FILE", "/nonexistent")
    monkeypatch.setenv("DATABASE_URL", "mysql://x")
    monkeypatch.setenv("METERLINE_WINDOW_SECONDS", "5")
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert "DATABASE_URL" in info.value.message
    assert "METERLINE_WINDOW_SECONDS" in info.value.message


def test_missing_pepper_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_ENV_FILE", "/nonexistent")
    monkeypatch.delenv("METERLINE_API_KEY_PEPPER", raising=False)
    with pytest.raises(ConfigurationError, match="METERLINE_API_KEY_PEPPER"):
        load_settings().pepper_bytes()


def test_topic_names_follow_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_ENV_FILE", "/nonexistent")
    monkeypatch.setenv("METERLINE_TOPIC_PREFIX", "acme")
    settings = load_settings()
    assert settings.events_topic == "acme.usage.events"
    assert settings.dlq_topic == "acme.usage.events.dlq"
