"""Every Kafka client of Meterline is built here, from one settings block: bootstrap servers,
security protocol, SASL (PLAIN, SCRAM-SHA-256/512) and TLS files.

kafka-python clients (ingest's producer, replay's and the lag reader's consumers, `replay dlq`,
the admin), aiokafka's producer (the dead-letter sink) and the faust app's broker options all take
their connection from `KafkaConnection`, so a cluster that needs SASL or TLS needs it set once.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

from shared.logs import register_secret
from shared.settings import Settings


@dataclass(frozen=True, slots=True)
class KafkaConnection:
    """Where the brokers are and how to authenticate to them."""

    bootstrap_servers: tuple[str, ...]
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_ca_file: str | None = None
    ssl_cert_file: str | None = None
    ssl_key_file: str | None = None
    ssl_key_password: str | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> KafkaConnection:
        password = settings.kafka_sasl_password.get_secret_value() or None
        key_password = settings.kafka_ssl_key_password.get_secret_value() or None
        for secret in (password, key_password):
            if secret:
                register_secret(secret)  # kafka clients log their configuration on errors
        return cls(
            bootstrap_servers=tuple(
                server.strip() for server in settings.kafka_bootstrap_servers.split(",") if server
            ),
            security_protocol=settings.kafka_security_protocol,
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_username=settings.kafka_sasl_username or None,
            sasl_password=password,
            ssl_ca_file=_path(settings.kafka_ssl_ca_file),
            ssl_cert_file=_path(settings.kafka_ssl_cert_file),
            ssl_key_file=_path(settings.kafka_ssl_key_file),
            ssl_key_password=key_password,
        )

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol.endswith("SSL")

    def _plain_options(self) -> dict[str, Any]:
        """What both client libraries take under the same names: servers, protocol, SASL."""
        options: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap_servers),
            "security_protocol": self.security_protocol,
        }
        if self.uses_sasl:
            options.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        return options

    def kafka_python_options(self) -> dict[str, Any]:
        """Connection keyword arguments of kafka-python's producer, consumer and admin."""
        options = self._plain_options()
        if self.uses_tls:
            options.update(
                ssl_check_hostname=True,
                ssl_cafile=self.ssl_ca_file,
                ssl_certfile=self.ssl_cert_file,
                ssl_keyfile=self.ssl_key_file,
                ssl_password=self.ssl_key_password,
            )
        return options

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of aiokafka and faust (hostname checked), or None without TLS."""
        if not self.uses_tls:
            return None
        context = ssl.create_default_context(cafile=self.ssl_ca_file)
        if self.ssl_cert_file:
            context.load_cert_chain(
                self.ssl_cert_file, self.ssl_key_file, password=self.ssl_key_password
            )
        return context

    def aiokafka_options(self) -> dict[str, Any]:
        """Connection keyword arguments of aiokafka's producer and consumer."""
        options = self._plain_options()
        context = self.ssl_context()
        if context is not None:
            options["ssl_context"] = context
        return options

    def faust_options(self) -> dict[str, Any]:
        """`broker` and `broker_credentials` of a faust.App (its consumer and producer)."""
        from faust.auth import SASLCredentials, SSLCredentials

        options: dict[str, Any] = {
            "broker": [f"kafka://{server}" for server in self.bootstrap_servers],
        }
        context = self.ssl_context()
        if self.uses_sasl:
            # With a context faust speaks SASL_SSL, without one SASL_PLAINTEXT.
            options["broker_credentials"] = SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password,
                mechanism=self.sasl_mechanism,
                ssl_context=context,
            )
        elif context is not None:
            options["broker_credentials"] = SSLCredentials(context)
        return options


def _path(value: object) -> str | None:
    return str(value) if value is not None else None


def connection(settings: Settings) -> KafkaConnection:
    return KafkaConnection.from_settings(settings)


def create_producer(settings: Settings, *, client_id: str, **options: Any) -> Any:
    """A kafka-python KafkaProducer (ingest, `replay dlq`)."""
    from kafka import KafkaProducer

    return KafkaProducer(
        **connection(settings).kafka_python_options(), client_id=client_id, **options
    )


def create_consumer(settings: Settings, *, client_id: str, **options: Any) -> Any:
    """A kafka-python KafkaConsumer that never joins a group on its own (replay's reader, the
    lag reader, `replay dlq`): callers assign partitions and commit explicitly."""
    from kafka import KafkaConsumer

    return KafkaConsumer(
        **connection(settings).kafka_python_options(),
        client_id=client_id,
        enable_auto_commit=False,
        **options,
    )


def create_admin(settings: Settings, *, request_timeout_ms: int = 10_000) -> Any:
    """A kafka-python KafkaAdminClient (topic creation and checks)."""
    from kafka.admin import KafkaAdminClient

    return KafkaAdminClient(
        **connection(settings).kafka_python_options(),
        client_id="meterline-admin",
        request_timeout_ms=request_timeout_ms,
    )


def create_async_producer(settings: Settings, *, client_id: str, **options: Any) -> Any:
    """An aiokafka AIOKafkaProducer (the aggregator's dead-letter sink); start() it on the loop
    that uses it."""
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(
        **connection(settings).aiokafka_options(), client_id=client_id, **options
    )


def faust_broker_options(settings: Settings) -> dict[str, Any]:
    """The faust.App keyword arguments that say where the brokers are and how to log in."""
    return connection(settings).faust_options()
