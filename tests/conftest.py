"""Session-wide real components (started once by deploy/local), a migrated database per run,
and per-test isolation: an outer transaction for in-process tests, unique names for the rest."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from shared import migrate
from shared.settings import Settings, load_settings
from tests import components, factories, stripe_fake


@pytest.fixture(scope="session")
def local_env() -> dict[str, str]:
    """Environment of the running components; starts them (idempotently) if they are not up."""
    if os.environ.get("METERLINE_TEST_NO_UP") != "1":
        components.up()
    env = components.local_env()
    missing = [
        k for k in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "STRIPE_API_BASE") if k not in env
    ]
    assert not missing, f".local/env lacks {missing}: run `make up`"
    return env


@pytest.fixture(scope="session")
def database_url(local_env: dict[str, str]) -> Iterator[str]:
    """A fresh database for this test run, migrated with Alembic (not create_all)."""
    admin_url = make_url(local_env["DATABASE_URL"]).set(drivername="postgresql+psycopg")
    name = f"meterline_test_{secrets.token_hex(4)}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)
    yield url
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def run_prefix() -> str:
    """Kafka topic prefix unique to this test run."""
    return f"test{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def service_env(local_env: dict[str, str], database_url: str, run_prefix: str) -> dict[str, str]:
    """Environment for subprocesses (services, CLI) pointed at this run's database and topics."""
    env = dict(os.environ)
    env.update(local_env)
    env["DATABASE_URL"] = database_url
    env["METERLINE_TOPIC_PREFIX"] = run_prefix
    # The factories hash keys with this pepper; services started by tests must verify with it.
    env["METERLINE_API_KEY_PEPPER"] = factories.PEPPER.decode()
    env["METERLINE_LOG_FORMAT"] = "json"
    return env


@pytest.fixture(scope="session")
def settings(service_env: dict[str, str]) -> Settings:
    keys = (
        "DATABASE_URL",
        "KAFKA_BOOTSTRAP_SERVERS",
        "STRIPE_API_BASE",
        "STRIPE_API_KEY",
        "METERLINE_API_KEY_PEPPER",
        "METERLINE_STRIPE_WEBHOOK_SECRET",
        "METERLINE_TOPIC_PREFIX",
    )
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: service_env[k] for k in keys if k in service_env})
    try:
        return load_settings()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def make_settings(service_env: dict[str, str]) -> Callable[..., Settings]:
    """Settings for this run with some values changed, e.g. make_settings(topic_prefix="x")."""

    def build(**overrides: object) -> Settings:
        saved = dict(os.environ)
        os.environ.update({k: v for k, v in service_env.items() if k.isupper()})
        try:
            return load_settings(**overrides)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    return build


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    built = sa.create_engine(database_url, pool_size=5, max_overflow=10)
    yield built
    built.dispose()


@pytest.fixture
def db(engine: Engine) -> Iterator[Session]:
    """A session inside an outer transaction that is rolled back after the test, even if the
    code under test commits (its commits become savepoints)."""
    connection = engine.connect()
    outer = connection.begin()
    session = Session(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        connection.close()


@pytest.fixture
def topic_prefix() -> str:
    """A Kafka topic prefix of this test's own, so tests never read each other's events."""
    return f"t{secrets.token_hex(4)}"


@pytest.fixture
def fake_stripe(local_env: dict[str, str]) -> Iterator[stripe_fake.FakeStripe]:
    """The stateful Stripe fake (tests/stripe_fake.py) in front of stripe-mock, per test."""
    with stripe_fake.running_fake(local_env["STRIPE_API_BASE"]) as fake:
        yield fake
