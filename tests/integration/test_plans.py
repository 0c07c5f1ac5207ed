"""`meterline plans apply|list` against a real database: upsert by key, field-path errors."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared.models import Plan

ROOT = Path(__file__).resolve().parents[2]
MELINE = str(ROOT / ".venv" / "bin" / "meterline")


def _run(service_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MELINE, *args],
        check=False,
        env=service_env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def _plan_file(tmp_path: Path, key: str, price_monthly: int, tiers: list[dict]) -> Path:
    path = tmp_path / f"{key}.json"
    path.write_text(
        json.dumps(
            {
                "plans": [
                    {
                        "key": key,
                        "name": "Team",
                        "price_monthly": price_monthly,
                        "features": {
                            "metered": {
                                "api_calls": {"included": 10, "model": "graduated", "tiers": tiers}
                            }
                        },
                    }
                ]
            }
        )
    )
    return path


def test_apply_creates_then_updates_a_plan_by_key(
    service_env: dict[str, str], engine: Engine, tmp_path: Path
) -> None:
    key = f"team-{secrets.token_hex(3)}"
    tiers = [{"up_to": 100, "unit_amount": "1"}, {"up_to": None, "unit_amount": "0.5"}]
    first = _run(
        service_env, "plans", "apply", str(_plan_file(tmp_path, key, 1000, tiers)), "--json"
    )
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["plans"] == [{"key": key, "result": "created"}]

    second = _run(
        service_env, "plans", "apply", str(_plan_file(tmp_path, key, 2000, tiers)), "--json"
    )
    assert json.loads(second.stdout)["plans"] == [{"key": key, "result": "updated"}]
    with engine.connect() as connection:
        rows = connection.execute(sa.select(Plan.price_monthly).where(Plan.key == key)).all()
    assert rows == [(2000,)]


def test_apply_names_the_field_path_of_a_bad_tier_and_changes_nothing(
    service_env: dict[str, str], engine: Engine, tmp_path: Path
) -> None:
    key = f"bad-{secrets.token_hex(3)}"
    tiers = [
        {"up_to": 100, "unit_amount": "1"},
        {"up_to": 50, "unit_amount": "1"},
        {"up_to": None, "unit_amount": "0.5"},
    ]
    result = _run(service_env, "plans", "apply", str(_plan_file(tmp_path, key, 0, tiers)))
    assert result.returncode == 1
    assert "plans[0].features.metered.api_calls.tiers[1].up_to: must be" in result.stderr
    assert "Traceback" not in result.stderr
    with engine.connect() as connection:
        assert connection.execute(sa.select(Plan.id).where(Plan.key == key)).all() == []


def test_the_example_plan_file_applies_and_lists(service_env: dict[str, str]) -> None:
    applied = _run(service_env, "plans", "apply", str(ROOT / "examples" / "plans.yaml"), "--json")
    assert applied.returncode == 0, applied.stderr
    listed = _run(service_env, "plans", "list", "--json")
    plans = {plan["key"]: plan for plan in json.loads(listed.stdout)["plans"]}
    assert plans["pro"]["features"]["metered"]["seats"]["aggregation"] == "max"
    assert plans["pro"]["price_yearly"] == 49000
