"""`meterline subscriptions ...` and `meterline invoices ...` as an operator runs them: --json
documents, one-line errors, and an invoice rendered as HTML whose numbers are checked."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from shared.db import unit_of_work
from shared.models import UsageRecord
from tests import factories

METERLINE = str(Path(sys.executable).parent / "meterline")
FEATURES = {
    "metered": {
        "api_calls": {
            "model": "graduated",
            "included": 1000,
            "tiers": [
                {"up_to": 100000, "unit_amount": "0.05"},
                {"up_to": None, "unit_amount": "0.02", "flat_amount": 500},
            ],
        },
        "storage_gb": {"model": "per_unit", "unit_amount": "12.5"},
    }
}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [METERLINE, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def ok(env: dict[str, str], *args: str) -> Any:
    done = cli(env, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


def setup(engine: Engine) -> tuple[str, str, str]:
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session, name="Acme Widgets")
        basic = factories.make_plan(session, price_monthly=4900, features=FEATURES)
        pro = factories.make_plan(session, price_monthly=9900, features=FEATURES)
        return organization.slug, basic.key, pro.key


def test_an_operator_creates_changes_and_cancels_a_subscription(
    service_env: dict[str, str], engine: Engine
) -> None:
    slug, basic, pro = setup(engine)

    created = ok(service_env, "subscriptions", "create", "--org", slug, "--plan", basic)
    again = cli(service_env, "subscriptions", "create", "--org", slug, "--plan", basic)
    changed = ok(service_env, "subscriptions", "change-plan", created["id"], "--plan", pro)
    shown = ok(service_env, "subscriptions", "show", created["id"])
    listed = ok(service_env, "subscriptions", "list", "--org", slug)
    canceled = ok(service_env, "subscriptions", "cancel", created["id"])
    twice = cli(service_env, "subscriptions", "cancel", created["id"])

    assert (created["organization"], created["plan"], created["status"]) == (slug, basic, "active")
    one_line_error(again, "already has a live subscription")
    assert changed["plan"] == pro
    assert [phase["plan"] for phase in shown["phases"]] == [basic, pro]
    assert [s["id"] for s in listed["subscriptions"]] == [created["id"]]
    assert canceled["status"] == "canceled" and canceled["canceled_at"]
    one_line_error(twice, "is canceled, not live")


def test_subscription_commands_refuse_bad_input_with_one_line(
    service_env: dict[str, str], engine: Engine
) -> None:
    slug, basic, _ = setup(engine)

    one_line_error(
        cli(service_env, "subscriptions", "create", "--org", slug, "--plan", "nope"),
        "plan 'nope' not found",
    )
    one_line_error(
        cli(service_env, "subscriptions", "create", "--org", "no-such-org", "--plan", basic),
        "not found",
    )
    one_line_error(
        cli(service_env, "subscriptions", "create", "--org", slug, "--plan", basic,
            "--start", "2020-01-01T00:00:00Z"),
        "lateness horizon",
    )  # fmt: skip
    one_line_error(cli(service_env, "subscriptions", "show", "12"), "not a subscription id")
    refused = cli(service_env, "subscriptions", "cancel", "12", "--json")
    assert refused.returncode == 1
    assert json.loads(refused.stderr)["error"]["code"] == "invalid"


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []
        self.by_id: dict[str, str] = {}
        self._open: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._open.append(dict(attrs).get("id"))

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        self.chunks.append(data)
        for name in self._open:
            if name:
                self.by_id[name] = self.by_id.get(name, "") + data

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.chunks).split())


def test_an_invoice_renders_as_a_page_a_customer_can_check(
    service_env: dict[str, str], engine: Engine, tmp_path: Path
) -> None:
    slug, basic, _ = setup(engine)
    start = (datetime.now(UTC) - timedelta(days=3)).replace(minute=0, second=0, microsecond=0)
    created = ok(service_env, "subscriptions", "create", "--org", slug, "--plan", basic,
                 "--start", start.isoformat())  # fmt: skip
    with unit_of_work(engine) as session:
        for hours, metric, quantity in ((1, "api_calls", "150000"), (2, "storage_gb", "3.5")):
            session.add(
                UsageRecord(
                    organization_id=created["organization_id"],
                    metric=metric,
                    window_start=start + timedelta(hours=hours),
                    window_seconds=3600,
                    quantity=Decimal(quantity),
                    event_count=1,
                )
            )
    billed = cli(service_env, "billing", "run", "--organization", created["organization_id"],
                 "--no-stripe", "--json")  # fmt: skip
    assert billed.returncode == 0, billed.stderr
    [listed] = ok(service_env, "invoices", "list", "--subscription", created["id"])["invoices"]
    page = tmp_path / "invoice.html"

    shown = ok(service_env, "invoices", "show", listed["id"], "--html", str(page))

    parsed = _Text()
    parsed.feed(page.read_text())
    text = parsed.text
    # 149,000 billable calls: 100,000 x 0.05 = 5,000 + 49,000 x 0.02 = 980 + 500 flat of tier 2
    # = 6,480 cents; 3.5 GB x 12.5 = 43.75 -> 44 cents; the fee 4,900 cents.
    assert shown["total"] == 4900 + 6480 + 44
    assert parsed.by_id["total"].strip() == "114.24 USD"
    assert parsed.by_id["flat"].strip() == "49.00 USD"
    assert "Meterline" in parsed.by_id["seller"] and "Acme Widgets" in parsed.by_id["customer"]
    assert slug in parsed.by_id["customer"]
    assert f"{start:%Y-%m-%d %H:%M:%S} UTC to" in parsed.by_id["period"]
    assert "api_calls" in text and "150,000 (149,000 billable)" in text
    assert "1 to 100,000: 0.0005 USD each; above 100,000: 0.0002 USD each + 5.00 USD" in text
    assert "(1,000 included)" in text and "64.80 USD" in text
    assert "storage_gb" in text and "0.125 USD each" in text and "0.44 USD" in text
    assert "Plan fee" in text and "49.00 USD" in text
    assert "Total (USD)" in text


def test_invoice_commands_refuse_an_unknown_invoice_and_an_unknown_status(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    one_line_error(
        cli(service_env, "invoices", "show", "00000000-0000-0000-0000-000000000000"),
        "not found",
    )
    one_line_error(cli(service_env, "invoices", "list", "--status", "paid"), "draft or final")
