"""The CLI of platform keys and external ids: `orgs create --external-id` (shown in lists and
--json), `subscriptions create --external-id`, `keys create --platform` (plaintext shown once,
stored hashed)."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared.keys import hash_key
from tests import factories


def meterline(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meterline", *args],
        env={**env, "METERLINE_API_KEY_PEPPER": factories.PEPPER.decode()},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_organization_external_id_is_unique_and_listed(service_env: dict[str, str]) -> None:
    slug, external_id = f"ext-{secrets.token_hex(3)}", f"cus_{secrets.token_hex(5)}"
    created = meterline(
        service_env, "orgs", "create", slug, "--owner", f"{slug}@example.com",
        "--external-id", external_id, "--json",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["external_id"] == external_id

    listed = meterline(service_env, "orgs", "list", "--json")
    [row] = [r for r in json.loads(listed.stdout) if r["slug"] == slug]
    assert row["external_id"] == external_id
    assert external_id in meterline(service_env, "orgs", "list").stdout

    again = meterline(
        service_env, "orgs", "create", slug + "x", "--owner", f"{slug}@example.com",
        "--external-id", external_id,
    )  # fmt: skip
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert "external id" in again.stderr and external_id in again.stderr


def test_subscription_external_id_is_unique_and_shown(
    service_env: dict[str, str], engine: Engine
) -> None:
    from shared.db import unit_of_work

    with unit_of_work(engine) as session:
        first = factories.make_organization(session).slug
        second = factories.make_organization(session).slug
        plan = factories.make_plan(session).key
    external_id = f"sub_{secrets.token_hex(5)}"
    created = meterline(
        service_env, "subscriptions", "create", "--org", first, "--plan", plan,
        "--external-id", external_id, "--json",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["external_id"] == external_id
    listed = meterline(service_env, "subscriptions", "list", "--org", first)
    assert external_id in listed.stdout

    taken = meterline(
        service_env, "subscriptions", "create", "--org", second, "--plan", plan,
        "--external-id", external_id,
    )  # fmt: skip
    assert taken.returncode != 0 and "Traceback" not in taken.stderr
    assert external_id in taken.stderr


def test_platform_key_is_shown_once_and_stored_hashed(
    service_env: dict[str, str], engine: Engine
) -> None:
    created = meterline(service_env, "keys", "create", "--platform", "--name", "backend", "--json")
    assert created.returncode == 0, created.stderr
    document = json.loads(created.stdout)
    assert document["platform"] is True
    plaintext = document["key"]
    with engine.connect() as connection:
        row = connection.execute(
            sa.text("SELECT organization_id, platform, key_hash FROM api_keys WHERE id = :id"),
            {"id": document["id"]},
        ).one()
    assert row.organization_id is None and row.platform is True
    assert bytes(row.key_hash) == hash_key(plaintext, factories.PEPPER)

    listed = meterline(service_env, "keys", "list", "--platform", "--json")
    [entry] = [k for k in json.loads(listed.stdout) if k["id"] == document["id"]]
    assert entry["platform"] is True and "key" not in entry
    assert plaintext not in listed.stdout


def test_platform_key_takes_no_organization(service_env: dict[str, str], engine: Engine) -> None:
    from shared.db import unit_of_work

    with unit_of_work(engine) as session:
        slug = factories.make_organization(session).slug
    both = meterline(service_env, "keys", "create", "--platform", "--org", slug)
    assert both.returncode != 0 and "Traceback" not in both.stderr
    assert "--platform" in both.stderr
    neither = meterline(service_env, "keys", "create", "--json")
    assert neither.returncode != 0
    assert "--org" in json.loads(neither.stdout or neither.stderr)["error"]["message"]
