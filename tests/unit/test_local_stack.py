"""deploy/local derives every Kafka port of a checkout from its two Kafka variables, so checkouts
(and CI) side by side never collide: the SCRAM listener two above, cluster node n at +8n."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.components import CTL


def servers(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CTL), "servers", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(
    ("brokers", "kind", "expected"),
    [
        ("1", "plain", "127.0.0.1:59292"),
        ("1", "sasl", "127.0.0.1:59294"),
        ("3", "plain", "127.0.0.2:59300,127.0.0.3:59308,127.0.0.4:59316"),
        ("3", "sasl", "127.0.0.2:59302,127.0.0.3:59310,127.0.0.4:59318"),
    ],
)
def test_kafka_ports_derive_from_the_checkout_ports(brokers: str, kind: str, expected: str) -> None:
    done = servers(
        kind,
        METERLINE_KAFKA_PORT="59292",
        METERLINE_KAFKA_CONTROLLER_PORT="59293",
        METERLINE_KAFKA_BROKERS=brokers,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected
    offsets = [int(s.rsplit(":", 1)[1]) - 59292 for s in expected.split(",")]
    assert all(0 <= offset <= 30 for offset in offsets)


@pytest.mark.parametrize(
    ("variable", "value"), [("METERLINE_KAFKA_BROKERS", "2"), ("METERLINE_KAFKA_AUTH", "kerberos")]
)
def test_an_unknown_kafka_mode_is_one_clear_error(variable: str, value: str) -> None:
    done = servers(**{variable: value})

    assert done.returncode != 0
    assert variable in done.stderr
