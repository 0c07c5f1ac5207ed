"""One settings block says how every Kafka client connects: plaintext, SASL (PLAIN, SCRAM) and TLS,
validated at start with errors that name the variable, and the password never logged."""

from __future__ import annotations

import logging
import ssl
import subprocess
from pathlib import Path

import pytest
from faust.auth import SASLCredentials, SSLCredentials

from shared.errors import ConfigurationError
from shared.kafka import KafkaConnection
from shared.logs import RedactingFilter
from shared.settings import Settings, load_settings

PASSWORD = "scram-secret-8f2c11"


def settings(**overrides: object) -> Settings:
    return load_settings(kafka_bootstrap_servers="k1:9092, k2:9092", **overrides)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed CA certificate and a client key pair (openssl, as an operator would)."""
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "client.key", folder / "client.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=meterline-test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return {"ca": cert, "cert": cert, "key": key}


def test_plaintext_is_the_default_and_names_every_bootstrap_server() -> None:
    connection = KafkaConnection.from_settings(settings())

    assert connection.kafka_python_options() == {
        "bootstrap_servers": ["k1:9092", "k2:9092"],
        "security_protocol": "PLAINTEXT",
    }
    assert connection.faust_options() == {"broker": ["kafka://k1:9092", "kafka://k2:9092"]}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_settings_reach_kafka_python_aiokafka_and_faust(mechanism: str) -> None:
    connection = KafkaConnection.from_settings(
        settings(
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_mechanism=mechanism,
            kafka_sasl_username="meterline",
            kafka_sasl_password=PASSWORD,
        )
    )

    sasl = {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "meterline",
        "sasl_plain_password": PASSWORD,
    }
    assert connection.kafka_python_options() == {
        "bootstrap_servers": ["k1:9092", "k2:9092"],
        **sasl,
    }
    assert connection.aiokafka_options() == {"bootstrap_servers": ["k1:9092", "k2:9092"], **sasl}
    credentials = connection.faust_options()["broker_credentials"]
    assert isinstance(credentials, SASLCredentials)
    assert (credentials.protocol.value, credentials.mechanism.value) == (
        "SASL_PLAINTEXT",
        mechanism,
    )
    assert (credentials.username, credentials.password) == ("meterline", PASSWORD)
    assert PASSWORD not in repr(connection)


def test_sasl_over_tls_carries_the_ca_and_client_certificate(tls_files: dict[str, Path]) -> None:
    connection = KafkaConnection.from_settings(
        settings(
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="SCRAM-SHA-512",
            kafka_sasl_username="meterline",
            kafka_sasl_password=PASSWORD,
            kafka_ssl_ca_file=tls_files["ca"],
            kafka_ssl_cert_file=tls_files["cert"],
            kafka_ssl_key_file=tls_files["key"],
        )
    )

    options = connection.kafka_python_options()
    assert (options["ssl_cafile"], options["ssl_certfile"], options["ssl_keyfile"]) == (
        str(tls_files["ca"]), str(tls_files["cert"]), str(tls_files["key"]),
    )  # fmt: skip
    context = connection.aiokafka_options()["ssl_context"]
    assert isinstance(context, ssl.SSLContext) and context.check_hostname
    credentials = connection.faust_options()["broker_credentials"]
    assert isinstance(credentials, SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL" and credentials.ssl_context is not None


def test_tls_without_sasl_gives_faust_ssl_credentials(tls_files: dict[str, Path]) -> None:
    connection = KafkaConnection.from_settings(
        settings(kafka_security_protocol="SSL", kafka_ssl_ca_file=tls_files["ca"])
    )

    credentials = connection.faust_options()["broker_credentials"]
    assert isinstance(credentials, SSLCredentials)
    assert connection.kafka_python_options()["ssl_cafile"] == str(tls_files["ca"])


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "KAFKA_SASL_MECHANISM"),
        (
            {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "PLAIN"},
            "KAFKA_SASL_PASSWORD",
        ),
        ({"kafka_sasl_mechanism": "SCRAM-SHA-256"}, "KAFKA_SASL_MECHANISM"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_ca_file": "/nonexistent/ca.pem"},
            "KAFKA_SSL_CA_FILE",
        ),
        ({"kafka_security_protocol": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
        ({"kafka_sasl_mechanism": "GSSAPI"}, "KAFKA_SASL_MECHANISM"),
        (
            {"topic_replication_factor": 1, "topic_min_insync_replicas": 2},
            "METERLINE_TOPIC_MIN_INSYNC_REPLICAS",
        ),
        ({"topic_retention_hours": 24}, "METERLINE_TOPIC_RETENTION_HOURS"),
    ],
)
def test_bad_kafka_settings_stop_the_start_naming_the_variable(
    overrides: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigurationError, match=named):
        settings(**overrides)


def test_sasl_password_is_redacted_from_every_log_record() -> None:
    KafkaConnection.from_settings(
        settings(
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_mechanism="SCRAM-SHA-256",
            kafka_sasl_username="meterline",
            kafka_sasl_password=PASSWORD,
        )
    )
    record = logging.LogRecord(
        "kafka", logging.ERROR, __file__, 1, "auth failed: %s", (PASSWORD,), None
    )

    RedactingFilter().filter(record)

    assert PASSWORD not in record.getMessage()


def test_topic_retention_defaults_to_the_horizon_plus_the_grace() -> None:
    configured = settings(lateness_horizon_days=35, ledger_grace_hours=48)

    assert configured.topic_retention.total_seconds() == (35 * 24 + 48) * 3600
    assert settings(topic_retention_hours=2000).topic_retention.total_seconds() == 2000 * 3600


def test_empty_kafka_variables_mean_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SSL_CA_FILE"):
        monkeypatch.setenv(name, "")

    connection = KafkaConnection.from_settings(settings())

    assert connection.security_protocol == "PLAINTEXT" and connection.ssl_ca_file is None
