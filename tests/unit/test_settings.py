"""Settings: validated at start, one clear error per bad value."""

from __future__ import annotations

from pathlib import Path

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


def test_a_window_that_does_not_divide_a_day_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_ENV_FILE", "/nonexistent")
    monkeypatch.setenv("METERLINE_WINDOW_SECONDS", "7000")
    with pytest.raises(ConfigurationError, match=r"METERLINE_WINDOW_SECONDS.*divide a day"):
        load_settings()


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


@pytest.mark.parametrize(
    ("variable", "value"),
    [("METERLINE_LOG_LEVEL", "verbose"), ("METERLINE_LOG_FORMAT", "xml")],
)
def test_unknown_log_level_or_format_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv("METERLINE_ENV_FILE", "/nonexistent")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert variable in info.value.message and value in info.value.message


def test_log_level_and_format_are_read_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_ENV_FILE", "/nonexistent")
    monkeypatch.setenv("METERLINE_LOG_LEVEL", "debug")
    monkeypatch.setenv("METERLINE_LOG_FORMAT", "TEXT")
    settings = load_settings()
    assert (settings.log_level, settings.log_format) == ("DEBUG", "text")


def test_ingest_listen_settings_come_from_the_env_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_file = tmp_path / "env"
    env_file.write_text(
        "export METERLINE_INGEST_HOST=0.0.0.0\n"
        "export METERLINE_INGEST_PORT=9090\n"
        "export METERLINE_INGEST_WORKERS=3\n"
    )
    for name in ("METERLINE_INGEST_HOST", "METERLINE_INGEST_PORT", "METERLINE_INGEST_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("METERLINE_ENV_FILE", str(env_file))
    settings = load_settings()
    assert (settings.ingest_host, settings.ingest_port, settings.ingest_workers) == (
        "0.0.0.0",
        9090,
        3,
    )
