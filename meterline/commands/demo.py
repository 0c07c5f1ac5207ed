"""`meterline demo`: the whole pipeline once on the local components, narrating each step.

migrate -> seed (and meters) -> demo keys -> start ingest and aggregator -> post traffic (with a
retried batch and an invalid one) -> wait until usage_records hold exactly the accepted events ->
post dimensional events of metered metrics and print their usage per dimension -> bill -> stop.

Every run tags its event ids with a run id of its own and reads the usage of its hours before it
posts, so a repeat run reports (and checks) what it added, never what earlier runs left there.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer

from meterline.output import EXIT_NEEDS_ATTENTION, EXIT_OK, cli_errors, print_table


def _say(step: str) -> None:
    typer.secho(f"\n== {step}", bold=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class DemoKey:
    organization: str
    organization_id: uuid.UUID
    project: str | None
    project_id: uuid.UUID | None
    plaintext: str


@dataclass(frozen=True, slots=True)
class Tally:
    """A quantity and how many events made it."""

    quantity: Decimal = Decimal(0)
    events: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.quantity + other.quantity, self.events + other.events)

    def __sub__(self, other: Tally) -> Tally:
        return Tally(self.quantity - other.quantity, self.events - other.events)


#: (organization slug, metric) -> its tally.
Tallies = dict[tuple[str, str], Tally]


@dataclass
class Expected:
    """What the pipeline must count: the distinct accepted events, by organization and metric."""

    totals: Tallies = field(default_factory=dict)

    def add(self, organization: str, metric: str, quantity: Decimal) -> None:
        key = (organization, metric)
        self.totals[key] = self.totals.get(key, Tally()) + Tally(quantity, 1)

    @property
    def events(self) -> dict[str, int]:
        """Distinct accepted events per organization."""
        found: dict[str, int] = {}
        for (organization, _), tally in self.totals.items():
            found[organization] = found.get(organization, 0) + tally.events
        return found


def added_since(before: Tallies, after: Tallies) -> Tallies:
    """What was added between two readings of the same hours: this run's share of windows that
    earlier runs may have written to as well."""
    return {key: after[key] - before.get(key, Tally()) for key in after}


def differences(expected: Expected, added: Tallies) -> list[str]:
    """Each (organization, metric) whose added usage is not exactly what was accepted."""
    keys = sorted(set(expected.totals) | {k for k, v in added.items() if v != Tally()})
    return [
        f"{organization} {metric}: accepted {want.events} events ({want.quantity}), "
        f"counted {got.events} ({got.quantity})"
        for organization, metric in keys
        if (want := expected.totals.get((organization, metric), Tally()))
        != (got := added.get((organization, metric), Tally()))
    ]


def _prepare(now: datetime) -> list[DemoKey]:
    """Migrate, seed (once), and mint fresh demo keys: one per organization and one per project."""
    from meterline.commands import context
    from shared import migrate
    from shared.apikeys import create_api_key
    from shared.db import unit_of_work
    from shared.meters import apply_meters
    from shared.organizations import find_organization, list_projects
    from shared.seed import seed

    settings = context.settings()
    engine = context.engine()
    _say("1. Migrate the database")
    migrate.upgrade(settings.database_url)
    typer.echo(f"schema at revision {migrate.current(settings.database_url)}")

    _say("2. Seed plans, organizations, members, projects and subscriptions")
    with unit_of_work(engine) as session:
        result = seed(
            session,
            pepper=settings.pepper_bytes(),
            now=now,
            environment=settings.api_key_environment,
        )
    typer.echo(
        f"plans {', '.join(result.plans)}; organizations {', '.join(result.organizations)}"
        + (" (already there from an earlier run)" if result.already_seeded else "")
    )
    with unit_of_work(engine) as session:
        applied = apply_meters(session, DEMO_METERS)
    typer.echo("meters " + ", ".join(f"{metric} ({result})" for metric, result in applied))

    _say("3. Create demo API keys (only their prefixes are stored in clear)")
    keys: list[DemoKey] = []
    with unit_of_work(engine) as session:
        for slug in ("acme", "globex"):
            organization = find_organization(session, slug)
            projects = {p.slug: p for p in list_projects(session, organization.id)}
            for project_slug in (None, "web"):
                project = projects.get(project_slug) if project_slug else None
                created = create_api_key(
                    session,
                    organization_id=organization.id,
                    actor_id=None,
                    name=f"demo {now:%Y-%m-%d %H:%M}",
                    pepper=settings.pepper_bytes(),
                    project_id=project.id if project else None,
                    environment=settings.api_key_environment,
                )
                keys.append(
                    DemoKey(
                        slug,
                        organization.id,
                        project_slug,
                        project.id if project else None,
                        created.plaintext,
                    )
                )
                scope = f"project {project_slug}" if project_slug else "organization"
                typer.echo(f"  {slug:<7} {scope:<13} key {created.key.prefix}")
    return keys


@contextmanager
def _service(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> Iterator[None]:
    log_path = log_dir / f"demo-{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 - our own console script
            [sys.executable, "-m", "meterline", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        typer.echo(f"  started {name} (pid {process.pid}, log {log_path})")
        try:
            yield
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            typer.echo(f"  stopped {name}")
        if process.returncode not in (0, -15, 143):
            typer.echo(f"  {name} exited with status {process.returncode}; see {log_path}")


def _wait_ready(base_url: str, timeout: float = 60.0) -> None:
    import httpx

    from shared.errors import MeterlineError

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/readyz", timeout=2)
            if response.status_code == 200:
                return
            last = response.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.3)
    raise MeterlineError(f"ingest did not become ready at {base_url}: {last}")


def _post_traffic(base_url: str, keys: list[DemoKey], now: datetime, run: str) -> Expected:
    import httpx

    from meterline_client import MeterlineClient

    _say("5. Post sample traffic through the ingest API")
    expected = Expected()
    metrics = [("api_calls", Decimal(1)), ("storage_gb", Decimal("0.5")), ("exports", Decimal(3))]
    first_batch: list[dict[str, Any]] = []
    for index, key in enumerate(keys):
        events = []
        for n in range(400 if key.organization == "acme" else 150):
            metric, quantity = metrics[n % len(metrics)]
            # Spread over the last three hours: several windows per metric.
            timestamp = now - timedelta(minutes=(n * 7) % 180)
            events.append(
                {
                    "id": f"demo-{run}-{uuid.uuid4()}",
                    "metric": metric,
                    "quantity": str(quantity),
                    "timestamp": timestamp.isoformat().replace("+00:00", "Z"),
                }
            )
            expected.add(key.organization, metric, quantity)
        with MeterlineClient(base_url, key.plaintext) as client:
            accepted = client.send(events)
        scope = f"project {key.project}" if key.project else "organization"
        typer.echo(f"  {key.organization:<7} {scope:<13} posted {len(events)}, accepted {accepted}")
        if index == 0:
            first_batch = events

    # A client that timed out and retried: the same ids again must not count twice.
    with MeterlineClient(base_url, keys[0].plaintext) as client:
        accepted = client.send(first_batch)
    typer.echo(f"  retried the first batch ({accepted} events, same ids): accepted, counted once")

    # One invalid event makes the whole batch fail; nothing of it is published.
    bad = [
        {"id": f"demo-{run}-bad-{uuid.uuid4()}", "metric": "api_calls"},
        {"id": f"demo-{run}-bad-{uuid.uuid4()}", "metric": "Not A Metric", "quantity": -1},
    ]
    response = httpx.post(
        f"{base_url}/v1/events",
        json={"events": bad},
        headers={"Authorization": f"Bearer {keys[0].plaintext}"},
        timeout=10,
    )
    details = response.json().get("error", {}).get("details")
    typer.echo(f"  an invalid batch got {response.status_code}: {details}")
    response = httpx.post(
        f"{base_url}/v1/events",
        json={"id": "x", "metric": "api_calls"},
        headers={"Authorization": "Bearer ml_live_notakey"},
        timeout=10,
    )
    typer.echo(f"  an unknown key got {response.status_code}")
    return expected


def _demo_meters() -> list[Any]:
    from shared.meters import MeterDefinition

    return [
        MeterDefinition("llm_tokens", "sum", ("model", "type")),
        MeterDefinition("active_users", "unique_count", (), property="user_id"),
    ]


DEMO_METERS = _demo_meters()


def _metered_traffic(base_url: str, key: DemoKey, now: datetime, run: str, timeout: float) -> None:
    """Dimensional events of the demo's meters, then their usage per dimension as the API
    reports it once every one is counted."""
    import httpx

    from meterline_client import MeterlineClient

    _say("6b. Meters: post LLM tokens by model and type, and active users")
    events: list[dict[str, Any]] = []
    for n in range(240):
        timestamp = (now - timedelta(minutes=(n * 11) % 180)).isoformat().replace("+00:00", "Z")
        events.append(
            {
                "id": f"demo-{run}-tokens-{n}",
                "metric": "llm_tokens",
                "quantity": str(100 + n % 7 * 50),
                "timestamp": timestamp,
                "properties": {
                    "model": ("small", "large")[n % 2],
                    "type": ("input", "output")[n // 2 % 2],
                },
            }
        )
        events.append(
            {
                "id": f"demo-{run}-users-{n}",
                "metric": "active_users",
                "timestamp": timestamp,
                "properties": {"user_id": f"user-{n % 17}"},
            }
        )
    start, end = now - timedelta(hours=4), now + timedelta(hours=1)
    with MeterlineClient(base_url, key.plaintext) as client:

        def counted() -> int:
            return sum(
                row.event_count
                for metric in ("llm_tokens", "active_users")
                for row in client.usage(
                    metric=metric, granularity="month", start=start, end=end
                ).rows
            )

        before = counted()
        accepted = client.send(events)
        typer.echo(f"  {key.organization}: posted {len(events)} events, accepted {accepted}")
        lacking = httpx.post(
            f"{base_url}/v1/events",
            json={**events[0], "id": f"demo-{run}-no-type", "properties": {"model": "small"}},
            headers={"Authorization": f"Bearer {key.plaintext}"},
            timeout=10,
        )
        typer.echo(
            f"  an llm_tokens event without its type got {lacking.status_code}: "
            f"{lacking.json().get('error', {}).get('details')}"
        )
        deadline = time.monotonic() + timeout
        while counted() < before + len(events):
            if time.monotonic() > deadline:
                from shared.errors import MeterlineError

                raise MeterlineError(
                    f"the metered events were not all counted within {timeout:.0f} s"
                )
            time.sleep(0.5)
        tokens = client.usage(
            metric="llm_tokens",
            group_by=["model", "type"],
            granularity="month",
            start=start,
            end=end,
        ).rows
        users = client.usage(metric="active_users", granularity="month", start=start, end=end).rows
        hourly = client.usage(metric="active_users", granularity="hour", start=start, end=end).rows
    typer.echo("\n  llm_tokens over the last hours, per model and type (sum):")
    print_table(
        ["model", "type", "tokens", "events"],
        [
            ((r.dimensions or {}).get("model"), (r.dimensions or {}).get("type"),
             _plain(r.quantity), r.event_count)
            for r in tokens
        ],
    )  # fmt: skip
    typer.echo(
        f"  active_users (unique_count of user_id): {sum(r.quantity for r in users)} distinct "
        f"over the range, while the hourly counts add up to {sum(r.quantity for r in hourly)}"
    )


def _plain(quantity: Decimal) -> str:
    """A quantity without trailing zeros or an exponent: 133.0 and 133 read the same."""
    return f"{quantity.normalize():f}"


def _read_usage(base_url: str, keys: list[DemoKey], now: datetime) -> Tallies:
    """Each organization's usage per metric over the hours the demo's events fall in (the last
    three; read wider), through the ingest API as a customer would."""
    from meterline_client import MeterlineClient

    found: Tallies = {}
    for key in keys:
        if key.project is not None:
            continue
        with MeterlineClient(base_url, key.plaintext) as client:
            rows = client.usage(
                start=now - timedelta(hours=4), end=now + timedelta(hours=1), granularity="hour"
            ).rows
        for row in rows:
            metric_key = (key.organization, row.metric or "")
            found[metric_key] = found.get(metric_key, Tally()) + Tally(
                row.quantity, row.event_count
            )
    return found


def _wait_for_usage(
    base_url: str,
    keys: list[DemoKey],
    expected: Expected,
    before: Tallies,
    now: datetime,
    timeout: float,
) -> Tallies:
    """Wait until usage_records hold exactly this run's accepted events on top of what was
    there before it posted; return what it added."""
    _say("6. Wait until usage_records hold exactly the accepted events")
    started = time.monotonic()
    while True:
        added = added_since(before, _read_usage(base_url, keys, now))
        wrong = differences(expected, added)
        if not wrong:
            break
        if time.monotonic() > started + timeout:
            from shared.errors import MeterlineError

            raise MeterlineError(
                f"usage did not reach exactly the accepted totals within {timeout:.0f} s ("
                + "; ".join(wrong)
                + "); see .local/logs/demo-aggregator.log"
            )
        time.sleep(0.5)
    typer.echo(f"  visible after {time.monotonic() - started:.1f} s")
    typer.echo("\n  usage this run added (earlier runs' usage in the same hours left out):")
    print_table(
        ["organization", "metric", "events accepted", "quantity accepted", "events counted",
         "quantity counted"],
        [
            (organization, metric, want.events, _plain(want.quantity), got.events,
             _plain(got.quantity))
            for (organization, metric), want in sorted(expected.totals.items())
            for got in [added.get((organization, metric), Tally())]
        ],
    )  # fmt: skip
    return added


def _exact_check(engine_url: str, expected: Expected, run: str, timeout: float) -> None:
    """This run's events, read back from the ledger by their run's id prefix, against what was
    accepted: each distinct accepted event recorded once, none of an earlier run's."""
    import sqlalchemy as sa

    engine = sa.create_engine(engine_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as connection:
                counted: dict[str, int] = dict(
                    connection.execute(
                        sa.text(
                            "SELECT o.slug, count(*) FROM usage_event_ledger l "
                            "JOIN organizations o ON o.id = l.organization_id "
                            "WHERE l.event_id LIKE :pattern GROUP BY o.slug"
                        ),
                        {"pattern": f"demo-{run}-%"},
                    ).all()
                )
            if all(counted.get(s, 0) >= n for s, n in expected.events.items()):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        engine.dispose()
    typer.echo(f"\n  this run's events (ids demo-{run}-...) in the event ledger:")
    rows = [(slug, expected.events[slug], counted.get(slug, 0)) for slug in sorted(expected.events)]
    print_table(["organization", "distinct events accepted", "events counted"], rows)
    if any(accepted != got for _, accepted, got in rows):
        from shared.errors import MeterlineError

        raise MeterlineError("counted events differ from accepted events")


def demo(
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for usage to become visible.")
    ] = 120.0,
    console: Annotated[
        bool,
        typer.Option(
            "--console/--no-console",
            help="At the end, serve the console (with ingest and the aggregator) until Ctrl-C.",
        ),
    ] = True,
) -> None:
    """Run the pipeline end to end on the local components and print what happened."""
    _stop_like_ctrl_c()
    with cli_errors():
        from meterline.commands import context

        settings = context.settings()
        now = datetime.now(UTC).replace(microsecond=0)
        run = uuid.uuid4().hex[:12]  # in every event id of this run
        keys = _prepare(now)

        _say("4. Start the ingest service and the aggregator")
        log_dir = Path(".local/logs")
        log_dir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        env = dict(os.environ)
        env.setdefault("METERLINE_AGGREGATOR_PORT", str(_free_port()))
        base_url = f"http://127.0.0.1:{port}"
        with (
            _service("ingest", ["ingest", "serve", "--port", str(port)], env, log_dir),
            _service("aggregator", ["aggregate", "run"], env, log_dir),
        ):
            _wait_ready(base_url)
            before = _read_usage(base_url, keys, now)
            expected = _post_traffic(base_url, keys, now, run)
            _wait_for_usage(base_url, keys, expected, before, now, timeout)
            _exact_check(
                settings.libpq_url.replace("postgresql://", "postgresql+psycopg://"),
                expected,
                run,
                timeout,
            )
            _metered_traffic(base_url, keys[0], now, run, timeout)
            _bill()
            _print_metered_lines(keys[0])
            if console:
                _serve_console(env, log_dir, ingest_url=base_url)
        _say("Done")
        typer.echo(
            "Posted traffic was counted exactly once (the retried batch and the invalid batch "
            "added nothing). Services are stopped; `make down` stops PostgreSQL, Kafka and "
            "stripe-mock."
        )


def _stop_like_ctrl_c() -> None:
    """Make SIGTERM and SIGHUP stop the demo as Ctrl-C does: every service it started is stopped.

    The services run in sessions of their own (so a Ctrl-C reaches only the demo, which then stops
    them in order); without this, a supervisor's or `timeout`'s SIGTERM would end the demo and leave
    ingest, the aggregator and the console running.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)


def _bill() -> None:
    _say("7. Bill: price usage against the plans, record invoices, report to Stripe, reconcile")
    billing = subprocess.run(
        [sys.executable, "-m", "meterline", "billing", "run"],
        env=dict(os.environ),
        check=False,
    )
    if billing.returncode not in (EXIT_OK, EXIT_NEEDS_ATTENTION):
        from shared.errors import MeterlineError

        raise MeterlineError(f"billing run failed (exit status {billing.returncode})")
    if billing.returncode == EXIT_NEEDS_ATTENTION:
        typer.echo(
            "  Unresolved mismatches above are expected here: stripe-mock keeps no state and "
            "answers every lookup with the same canned fixture (an invoice total and meter "
            "summaries of its own), so reconciliation rightly flags them. The integration "
            "tests run the same reconciliation against a stateful Stripe fake, where they "
            "agree. Resolve them in the console (Mismatches)."
        )


def _print_metered_lines(key: DemoKey) -> None:
    """The metered lines of the organization's open invoice: one per priced filter."""
    from meterline.commands import context
    from services.billing import invoice_repository

    with context.engine().connect() as connection:
        invoices = invoice_repository.list_invoices(
            connection, organization_id=key.organization_id, subscription_id=None,
            status="draft", limit=1,
        )  # fmt: skip
    lines = [
        (line.metric, _plain(line.quantity), _plain(line.billable_quantity), line.amount)
        for invoice in invoices
        for line in invoice.lines
        if line.kind == "usage" and (line.metric or "").startswith(("llm_tokens", "active_users"))
    ]
    typer.echo(f"\n  {key.organization}'s open invoice, lines per priced filter (minor units):")
    print_table(["line", "quantity", "billable", "amount"], lines)


def _serve_console(env: dict[str, str], log_dir: Path, *, ingest_url: str) -> None:
    """Mint a demo admin operator, start the console and wait for Ctrl-C."""
    from meterline.commands import context
    from shared.db import unit_of_work
    from shared.models import OperatorRole
    from shared.operators import create_operator

    _say("8. Open the console")
    settings = context.settings()
    with unit_of_work(context.engine()) as session:
        created = create_operator(
            session,
            name=f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}",
            role=OperatorRole.ADMIN,
            pepper=settings.pepper_bytes(),
        )
        token = created.plaintext
    port = settings.console_port
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:  # taken: any free port will do
            port = _free_port()
    console_env = {
        **env,
        "METERLINE_CONSOLE_INGEST_URLS": ingest_url,
        "METERLINE_CONSOLE_AGGREGATOR_URLS": f"http://127.0.0.1:{env['METERLINE_AGGREGATOR_PORT']}",
        "METERLINE_CONSOLE_SAMPLE_SECONDS": "5",
    }
    url = f"http://127.0.0.1:{port}"
    with _service("console", ["console", "--port", str(port)], console_env, log_dir):
        typer.echo(f"  console:        {url}/  (admin API: {url}/admin/v1/openapi.json)")
        typer.echo(f"  operator token: {token}  (admin; shown once)")
        typer.echo("  Press Ctrl-C to stop the console, ingest and the aggregator.")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            typer.echo("")
