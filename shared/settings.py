"""The one settings object, read from the environment (and `.local/env` written by `make up`)."""

from __future__ import annotations

import os
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigurationError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "text")

KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaSaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


def _env_file() -> Path | None:
    explicit = os.environ.get("METERLINE_ENV_FILE")
    if explicit:
        return Path(explicit)
    local = Path.cwd() / ".local" / "env"
    return local if local.is_file() else None


class Settings(BaseSettings):
    """Everything configurable. Defaults match what `make up` starts on loopback."""

    # An empty variable means "not set" (compose passes unset ones as empty strings).
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, env_ignore_empty=True)

    database_url: str = Field(
        "postgresql+psycopg://meterline:meterline@127.0.0.1:55432/meterline",
        validation_alias="DATABASE_URL",
    )
    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:59092", validation_alias="KAFKA_BOOTSTRAP_SERVERS"
    )
    # How every Kafka client connects (shared/kafka.py builds them all from these).
    kafka_security_protocol: KafkaSecurityProtocol = Field(
        "PLAINTEXT", validation_alias="KAFKA_SECURITY_PROTOCOL"
    )
    kafka_sasl_mechanism: KafkaSaslMechanism | None = Field(
        None, validation_alias="KAFKA_SASL_MECHANISM"
    )
    kafka_sasl_username: str = Field("", validation_alias="KAFKA_SASL_USERNAME")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), validation_alias="KAFKA_SASL_PASSWORD")
    kafka_ssl_ca_file: Path | None = Field(None, validation_alias="KAFKA_SSL_CA_FILE")
    kafka_ssl_cert_file: Path | None = Field(None, validation_alias="KAFKA_SSL_CERT_FILE")
    kafka_ssl_key_file: Path | None = Field(None, validation_alias="KAFKA_SSL_KEY_FILE")
    kafka_ssl_key_password: SecretStr = Field(
        SecretStr(""), validation_alias="KAFKA_SSL_KEY_PASSWORD"
    )
    stripe_api_base: str = Field("http://127.0.0.1:12111", validation_alias="STRIPE_API_BASE")
    stripe_api_key: SecretStr = Field(SecretStr("sk_test_123"), validation_alias="STRIPE_API_KEY")
    stripe_webhook_secret: SecretStr = Field(
        SecretStr(""), validation_alias="METERLINE_STRIPE_WEBHOOK_SECRET"
    )
    api_key_pepper: SecretStr = Field(SecretStr(""), validation_alias="METERLINE_API_KEY_PEPPER")
    api_key_environment: str = Field("live", validation_alias="METERLINE_API_KEY_ENVIRONMENT")

    topic_prefix: str = Field("meterline", validation_alias="METERLINE_TOPIC_PREFIX")
    topic_partitions: int = Field(4, ge=1, le=1024, validation_alias="METERLINE_TOPIC_PARTITIONS")
    # None: the broker's default.replication.factor / min.insync.replicas.
    topic_replication_factor: int | None = Field(
        None, ge=1, le=32, validation_alias="METERLINE_TOPIC_REPLICATION_FACTOR"
    )
    topic_min_insync_replicas: int | None = Field(
        None, ge=1, le=32, validation_alias="METERLINE_TOPIC_MIN_INSYNC_REPLICAS"
    )
    # None: the lateness horizon plus the ledger grace (topic_retention).
    topic_retention_hours: int | None = Field(
        None, ge=1, validation_alias="METERLINE_TOPIC_RETENTION_HOURS"
    )
    window_seconds: int = Field(3600, ge=60, le=86400, validation_alias="METERLINE_WINDOW_SECONDS")
    lateness_horizon_days: int = Field(
        35, ge=1, le=366, validation_alias="METERLINE_LATENESS_HORIZON_DAYS"
    )
    max_future_seconds: int = Field(
        300, ge=0, le=3600, validation_alias="METERLINE_MAX_FUTURE_SECONDS"
    )
    key_cache_ttl_seconds: float = Field(
        2.0, gt=0, le=5, validation_alias="METERLINE_KEY_CACHE_TTL_SECONDS"
    )
    # Ingest: per-key token bucket (requests per second, per worker process), how long a
    # request may wait for the broker's acknowledgement before answering 503, how often key
    # usage is flushed.
    ingest_rate_limit_per_second: float = Field(
        1000.0, gt=0, validation_alias="METERLINE_INGEST_RATE_LIMIT_PER_SECOND"
    )
    ingest_rate_limit_burst: int = Field(
        2000, ge=1, validation_alias="METERLINE_INGEST_RATE_LIMIT_BURST"
    )
    # Failed authentications (a key not known to be valid) per client address and worker: over
    # this, such requests get 429 without a database read.
    ingest_auth_failures_per_second: float = Field(
        10.0, gt=0, validation_alias="METERLINE_INGEST_AUTH_FAILURES_PER_SECOND"
    )
    ingest_auth_failure_burst: int = Field(
        50, ge=1, validation_alias="METERLINE_INGEST_AUTH_FAILURE_BURST"
    )
    ingest_publish_timeout_seconds: float = Field(
        5.0, gt=0, le=60, validation_alias="METERLINE_INGEST_PUBLISH_TIMEOUT_SECONDS"
    )
    key_usage_flush_seconds: float = Field(
        3.0, gt=0, le=60, validation_alias="METERLINE_KEY_USAGE_FLUSH_SECONDS"
    )
    aggregator_batch_messages: int = Field(
        500, ge=1, le=100_000, validation_alias="METERLINE_AGGREGATOR_BATCH_MESSAGES"
    )
    aggregator_batch_seconds: float = Field(
        0.25, gt=0, le=30, validation_alias="METERLINE_AGGREGATOR_BATCH_SECONDS"
    )
    aggregator_web_host: str = Field("127.0.0.1", validation_alias="METERLINE_AGGREGATOR_HOST")
    aggregator_web_port: int = Field(
        6066, ge=0, le=65535, validation_alias="METERLINE_AGGREGATOR_PORT"
    )
    # Replay: records read per staging write, and the most events one slice of the range is
    # rebuilt from under the replay lock (live batches wait for one slice at a time).
    replay_chunk_records: int = Field(
        1000, ge=1, le=100_000, validation_alias="METERLINE_REPLAY_CHUNK_RECORDS"
    )
    replay_slice_events: int = Field(
        10_000, ge=1, le=10_000_000, validation_alias="METERLINE_REPLAY_SLICE_EVENTS"
    )
    ledger_grace_hours: int = Field(
        48, ge=0, le=24 * 30, validation_alias="METERLINE_LEDGER_GRACE_HOURS"
    )
    # The aggregator's static group membership (group.instance.id): "auto" is <host>-<port>,
    # stable across restarts of one instance, so a restarted instance takes its partitions back
    # at once instead of after the dead member's session; "none" joins as a dynamic member.
    aggregator_instance_id: str = Field(
        "auto",
        pattern=r"^[A-Za-z0-9._-]{1,200}$",
        validation_alias="METERLINE_AGGREGATOR_INSTANCE_ID",
    )
    # After SIGTERM the aggregator finishes what it can and exits within this long, whatever
    # is still pending (the unfinished batch is redelivered, as after a crash).
    aggregator_stop_seconds: float = Field(
        8.0, ge=1, le=600, validation_alias="METERLINE_AGGREGATOR_STOP_SECONDS"
    )
    aggregator_stall_seconds: float = Field(
        60.0, ge=1, le=86400, validation_alias="METERLINE_AGGREGATOR_STALL_SECONDS"
    )
    billing_interval_seconds: int = Field(
        3600, ge=10, le=7 * 86400, validation_alias="METERLINE_BILLING_INTERVAL_SECONDS"
    )
    billing_host: str = Field("127.0.0.1", validation_alias="METERLINE_BILLING_HOST")
    billing_port: int = Field(8082, ge=0, le=65535, validation_alias="METERLINE_BILLING_PORT")
    stripe_rate_per_second: float = Field(
        25.0, gt=0, le=1000, validation_alias="METERLINE_STRIPE_RATE_PER_SECOND"
    )
    stripe_settle_seconds: int = Field(
        900, ge=0, le=86400, validation_alias="METERLINE_STRIPE_SETTLE_SECONDS"
    )
    ingest_host: str = Field("127.0.0.1", validation_alias="METERLINE_INGEST_HOST")
    ingest_port: int = Field(8080, ge=1, le=65535, validation_alias="METERLINE_INGEST_PORT")
    ingest_workers: int = Field(1, ge=1, le=64, validation_alias="METERLINE_INGEST_WORKERS")
    # The console (`meterline console`): where it listens, how long a browser session lasts, how
    # often it samples the pipeline, and the ingest and aggregator URLs its health page probes
    # (comma-separated; empty: the ingest and aggregator host and port above).
    console_host: str = Field("127.0.0.1", validation_alias="METERLINE_CONSOLE_HOST")
    console_port: int = Field(8090, ge=1, le=65535, validation_alias="METERLINE_CONSOLE_PORT")
    console_session_hours: float = Field(
        12.0, gt=0, le=24 * 7, validation_alias="METERLINE_CONSOLE_SESSION_HOURS"
    )
    console_sample_seconds: float = Field(
        15.0, ge=1, le=3600, validation_alias="METERLINE_CONSOLE_SAMPLE_SECONDS"
    )
    console_ingest_urls: str = Field("", validation_alias="METERLINE_CONSOLE_INGEST_URLS")
    console_aggregator_urls: str = Field("", validation_alias="METERLINE_CONSOLE_AGGREGATOR_URLS")
    # Who issues the invoices (`invoices show --html`): a name, and address lines split on ";".
    seller_name: str = Field("Meterline", validation_alias="METERLINE_SELLER_NAME")
    seller_address: str = Field("", validation_alias="METERLINE_SELLER_ADDRESS")
    log_level: str = Field("INFO", validation_alias="METERLINE_LOG_LEVEL")
    log_format: str = Field("json", validation_alias="METERLINE_LOG_FORMAT")

    @field_validator("database_url")
    @classmethod
    def _psycopg_driver(cls, value: str) -> str:
        for prefix in ("postgresql://", "postgres://"):
            if value.startswith(prefix):
                return "postgresql+psycopg://" + value[len(prefix) :]
        if not value.startswith("postgresql+psycopg://"):
            raise ValueError("must be a postgresql:// or postgresql+psycopg:// URL")
        return value

    @field_validator("window_seconds")
    @classmethod
    def _window_divides_a_day(cls, value: int) -> int:
        # Windows then never straddle a UTC midnight: the daily rollup and the usage cuts that
        # split billing periods exactly both rest on it.
        if 86400 % value:
            raise ValueError("must divide a day (86400) evenly, e.g. 60, 300, 900, 3600, 86400")
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        if not value or any(c not in "abcdefghijklmnopqrstuvwxyz0123456789._-" for c in value):
            raise ValueError("must be lowercase letters, digits, '.', '_' or '-'")
        return value

    @field_validator("api_key_environment")
    @classmethod
    def _environment(cls, value: str) -> str:
        if value not in ("live", "test"):
            raise ValueError("must be 'live' or 'test'")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)} (not {value!r})")
        return level

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        fmt = value.strip().lower()
        if fmt not in LOG_FORMATS:
            raise ValueError(f"must be one of {', '.join(LOG_FORMATS)} (not {value!r})")
        return fmt

    @model_validator(mode="after")
    def _kafka_and_topics(self) -> Settings:
        problems = []
        protocol = self.kafka_security_protocol
        if protocol.startswith("SASL_"):
            if self.kafka_sasl_mechanism is None:
                problems.append(f"KAFKA_SASL_MECHANISM: required with {protocol}")
            if not self.kafka_sasl_username or not self.kafka_sasl_password.get_secret_value():
                problems.append(
                    f"KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD: both required with {protocol}"
                )
        elif self.kafka_sasl_mechanism is not None:
            problems.append(
                f"KAFKA_SASL_MECHANISM: needs KAFKA_SECURITY_PROTOCOL SASL_PLAINTEXT or "
                f"SASL_SSL, not {protocol}"
            )
        files = {
            "KAFKA_SSL_CA_FILE": self.kafka_ssl_ca_file,
            "KAFKA_SSL_CERT_FILE": self.kafka_ssl_cert_file,
            "KAFKA_SSL_KEY_FILE": self.kafka_ssl_key_file,
        }
        given = {name: path for name, path in files.items() if path is not None}
        if given and not protocol.endswith("SSL"):
            problems.append(
                f"{', '.join(given)}: need KAFKA_SECURITY_PROTOCOL SSL or SASL_SSL, not {protocol}"
            )
        for name, path in given.items():
            if not path.is_file():
                problems.append(f"{name}: no readable file at {path}")
        if (self.kafka_ssl_cert_file is None) != (self.kafka_ssl_key_file is None):
            problems.append("KAFKA_SSL_CERT_FILE, KAFKA_SSL_KEY_FILE: give both or neither")
        replicas, in_sync = self.topic_replication_factor, self.topic_min_insync_replicas
        if replicas is not None and in_sync is not None and in_sync > replicas:
            problems.append(
                f"METERLINE_TOPIC_MIN_INSYNC_REPLICAS: {in_sync} is more than "
                f"METERLINE_TOPIC_REPLICATION_FACTOR {replicas}"
            )
        needed = self.minimum_retention_hours
        if self.topic_retention_hours is not None and self.topic_retention_hours < needed:
            problems.append(
                f"METERLINE_TOPIC_RETENTION_HOURS: {self.topic_retention_hours} is less than the "
                f"lateness horizon plus the ledger grace ({needed} hours); replay needs the log "
                "that long"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def minimum_retention_hours(self) -> int:
        """How long the topics must keep records: the lateness horizon (replay reads that far
        back) plus the ledger grace (how far behind the aggregator may fall)."""
        return self.lateness_horizon_days * 24 + self.ledger_grace_hours

    @property
    def topic_retention(self) -> timedelta:
        """retention.ms of the topics Meterline creates."""
        return timedelta(hours=self.topic_retention_hours or self.minimum_retention_hours)

    @property
    def events_topic(self) -> str:
        return f"{self.topic_prefix}.usage.events"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}.usage.events.dlq"

    @property
    def ingest_urls(self) -> list[str]:
        """Base URLs of the ingest instances the console probes."""
        listed = [u.strip().rstrip("/") for u in self.console_ingest_urls.split(",") if u.strip()]
        return listed or [f"http://{self.ingest_host}:{self.ingest_port}"]

    @property
    def aggregator_urls(self) -> list[str]:
        """Base URLs of the aggregator instances' /healthz and /metrics."""
        listed = [
            u.strip().rstrip("/") for u in self.console_aggregator_urls.split(",") if u.strip()
        ]
        return listed or [f"http://{self.aggregator_web_host}:{self.aggregator_web_port}"]

    @property
    def lateness_horizon(self) -> timedelta:
        return timedelta(days=self.lateness_horizon_days)

    @property
    def libpq_url(self) -> str:
        """The URL without the SQLAlchemy driver suffix, for psql, pg_dump and raw psycopg."""
        return self.database_url.replace("postgresql+psycopg://", "postgresql://", 1)

    def pepper_bytes(self) -> bytes:
        pepper = self.api_key_pepper.get_secret_value()
        if len(pepper) < 16:
            raise ConfigurationError(
                "METERLINE_API_KEY_PEPPER is not set (or shorter than 16 characters); "
                "run `make up` or set it to a long random secret"
            )
        return pepper.encode()


def load_settings(**overrides: object) -> Settings:
    """Read and validate settings; a bad value is one ConfigurationError naming the variable."""
    env_file = _env_file()
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            if not error["loc"]:
                # A rule across several variables: its message names them.
                problems.append(str(error["msg"]).removeprefix("Value error, "))
                continue
            field = str(error["loc"][0])
            alias = (
                Settings.model_fields[field].validation_alias
                if field in Settings.model_fields
                else None
            )
            problems.append(f"{alias or field}: {error['msg']}")
        raise ConfigurationError("invalid configuration: " + "; ".join(problems)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
