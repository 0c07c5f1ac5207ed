"""Rules of STYLE.md that a grep can keep from rotting."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for d in ("services", "shared") for p in (ROOT / d).rglob("*.py")]


def test_no_database_commit_below_the_edges() -> None:
    """Transactions commit at the edge (`session.begin()`, unit_of_work); no helper commits."""
    pattern = re.compile(r"\b(session|connection|conn|db|tx)\.commit\(")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in SOURCES
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_no_grab_bag_modules() -> None:
    banned = {"utils.py", "helpers.py", "common.py"}
    assert [str(p.relative_to(ROOT)) for p in SOURCES if p.name in banned] == []


def test_no_floats_near_money_in_pricing() -> None:
    pricing = ROOT / "services" / "billing" / "pricing.py"
    if pricing.exists():
        assert "float(" not in pricing.read_text()
