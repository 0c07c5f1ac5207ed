"""The CLI as a new operator meets it: bad input gets one clear line and no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from sqlalchemy.engine import make_url

from tests import factories  # noqa: F401  (keeps the pepper in one place)


def meterline(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meterline", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_clean_failure(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    text = (result.stderr + result.stdout).lower()
    for needle in needles:
        assert needle.lower() in text, text


@pytest.fixture(scope="module")
def seeded(service_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = meterline(service_env, "db", "seed")
    assert result.returncode == 0, result.stderr
    return result


def test_seed_prints_keys_once_and_pg_dump_holds_no_plaintext(
    service_env: dict[str, str], seeded: subprocess.CompletedProcess[str]
) -> None:
    keys = [word for word in seeded.stdout.split() if word.startswith("ml_live_")]
    assert len(keys) == 6
    url = make_url(service_env["DATABASE_URL"])
    dump = subprocess.run(
        [
            "pg_dump",
            "-h",
            url.host or "127.0.0.1",
            "-p",
            str(url.port),
            "-U",
            url.username or "",
            url.database or "",
        ],
        env={**os.environ, "PGPASSWORD": url.password or ""},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "api_keys" in dump
    for key in keys:
        assert key not in dump
        assert key.split("_")[3] not in dump  # not even the secret part


def test_second_seed_creates_nothing_and_says_so(
    service_env: dict[str, str], seeded: object
) -> None:
    result = meterline(service_env, "db", "seed")
    assert result.returncode == 0
    assert "already seeded" in result.stdout
    assert "ml_live_" not in result.stdout


def test_keys_list_shows_prefixes_never_keys(
    service_env: dict[str, str], seeded: subprocess.CompletedProcess[str]
) -> None:
    result = meterline(service_env, "keys", "list", "--org", "acme", "--json")
    assert result.returncode == 0, result.stderr
    assert "ml_live_" not in result.stdout
    assert result.stdout.count('"prefix"') == 3


def test_created_key_is_shown_once_and_revocable(
    service_env: dict[str, str], seeded: object
) -> None:
    created = meterline(
        service_env, "keys", "create", "--org", "acme", "--project", "web", "--name", "ci"
    )
    assert created.returncode == 0, created.stderr
    prefix = created.stdout.split()[2]
    revoked = meterline(service_env, "keys", "revoke", prefix)
    assert revoked.returncode == 0 and prefix in revoked.stdout
    listed = meterline(service_env, "keys", "list", "--org", "acme", "--json")
    assert '"state": "revoked"' in listed.stdout


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("keys", "create"), ("--org",)),
        (("keys", "create", "--org", "no-such-org"), ("no-such-org", "not found")),
        (("keys", "create", "--org", "acme", "--project", "nope"), ("nope",)),
        (("keys", "create", "--org", "acme", "--expires-at", "tomorrow"), ("--expires-at",)),
        (("keys", "revoke", "zzzzzzzz"), ("not found",)),
        (("keys", "list", "--org", "ghost"), ("ghost",)),
        (("orgs", "create", "acme", "--owner", "a@b.c"), ("already exists",)),
        (("orgs", "create", "Bad Slug!", "--owner", "a@b.c"), ("slug",)),
        (("orgs", "create", "fresh-org"), ("--owner",)),
        (("orgs", "delete", "acme"), ("--yes",)),
        (("orgs", "members", "add", "acme", "x@y.z", "--role", "king"), ("unknown role",)),
        (
            ("orgs", "members", "role", "acme", "owner@acme.example", "--role", "member"),
            ("one owner",),
        ),
        (("orgs", "members", "remove", "acme", "owner@acme.example"), ("one owner",)),
        (("orgs", "projects", "create", "acme", "web"), ("taken",)),
        (("db", "downgrade"), ("revision",)),
        # Alembic's own refusals are one line naming the revision, never a traceback.
        (("db", "upgrade", "0999_nosuch"), ("migration refused", "0999_nosuch")),
        (("db", "downgrade", "0999_nosuch"), ("migration refused", "0999_nosuch")),
        (("nonsense",), ("no such command",)),
    ],
)
def test_bad_input_is_one_clear_error(
    service_env: dict[str, str], seeded: object, args: tuple[str, ...], needles: tuple[str, ...]
) -> None:
    assert_clean_failure(meterline(service_env, *args), *needles)


@pytest.mark.parametrize(
    "args",
    [
        ("orgs",),
        ("keys", "list", "--org", "acme"),
        ("db", "upgrade"),
        ("db", "seed"),
        ("plans", "list"),
    ],
)
def test_database_down_is_one_clear_error(
    service_env: dict[str, str], args: tuple[str, ...]
) -> None:
    env = {**service_env, "DATABASE_URL": "postgresql://meterline:meterline@127.0.0.1:9/meterline"}
    result = meterline(env, *args)
    assert_clean_failure(result, "database")
    assert "meterline@" not in result.stderr or ":meterline@" not in result.stderr  # no password


def test_missing_pepper_is_a_clear_error(service_env: dict[str, str], seeded: object) -> None:
    env = {**service_env, "METERLINE_API_KEY_PEPPER": "", "METERLINE_ENV_FILE": "/nonexistent"}
    assert_clean_failure(
        meterline(env, "keys", "create", "--org", "acme"), "METERLINE_API_KEY_PEPPER"
    )


def test_aggregator_refuses_a_web_port_another_process_holds(service_env: dict[str, str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**service_env, "METERLINE_AGGREGATOR_PORT": str(port)}

        result = meterline(env, "aggregate", "run")

    # Two instances on one port would share one static group membership id.
    assert_clean_failure(result, f"METERLINE_AGGREGATOR_PORT {port}", "in use")


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_MECHANISM"),
        ({"KAFKA_SASL_MECHANISM": "SCRAM-SHA-1"}, "KAFKA_SASL_MECHANISM"),
        ({"METERLINE_TOPIC_RETENTION_HOURS": "24"}, "METERLINE_TOPIC_RETENTION_HOURS"),
    ],
)
def test_bad_kafka_settings_are_one_clear_error(
    service_env: dict[str, str], settings: dict[str, str], named: str
) -> None:
    result = meterline({**service_env, **settings}, "replay", "dlq", "--dry-run")

    assert_clean_failure(result, named)
