"""The deployment manifests keep the aggregator observable and the Kafka credentials secret:
/healthz and /metrics on every interface, probed and scraped, SASL/TLS from the Secrets, and only
settings the code knows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from shared.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KNOWN = {str(field.validation_alias) for field in Settings.model_fields.values()}


def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    documents: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            documents[(document["kind"], document["metadata"]["name"])] = document
    return documents


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def test_k8s_aggregator_serves_health_and_metrics_on_all_interfaces_probed_and_scraped() -> None:
    aggregator = k8s()[("StatefulSet", "meterline-aggregator")]
    pod = aggregator["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = container_env(container)
    port = int(env["METERLINE_AGGREGATOR_PORT"])

    assert env["METERLINE_AGGREGATOR_HOST"] == "0.0.0.0"
    assert {"name": "metrics", "containerPort": port} in container["ports"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }
    # Static membership needs a name that survives a restart: the StatefulSet pod's.
    assert env["METERLINE_AGGREGATOR_INSTANCE_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    stop = Settings.model_fields["aggregator_stop_seconds"].default
    assert pod["spec"]["terminationGracePeriodSeconds"] > stop


def test_k8s_kafka_credentials_come_from_the_secrets() -> None:
    documents = k8s()
    config = documents[("ConfigMap", "meterline-config")]["data"]
    secret = documents[("Secret", "meterline-secrets")]["stringData"]
    tls = documents[("Secret", "meterline-kafka-tls")]["stringData"]

    assert config["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert {"KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"} <= secret.keys()
    assert not {"KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"} & config.keys()
    assert "ca.crt" in tls
    for kind, name in (("StatefulSet", "meterline-aggregator"), ("Deployment", "meterline-ingest")):
        spec = documents[(kind, name)]["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert {"secretRef": {"name": "meterline-secrets"}} in container["envFrom"]
        (mount,) = container["volumeMounts"]
        assert config["KAFKA_SSL_CA_FILE"] == f"{mount['mountPath']}/ca.crt"
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes[mount["name"]]["secret"]["secretName"] == "meterline-kafka-tls"


def test_manifests_name_only_settings_the_code_reads() -> None:
    documents = k8s()
    names = set(documents[("ConfigMap", "meterline-config")]["data"])
    names |= set(documents[("Secret", "meterline-secrets")]["stringData"])
    for document in documents.values():
        for container in (
            document.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        ):
            names |= {item["name"] for item in container.get("env", [])}
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        if service.get("image") == "meterline:local":  # ours, not the broker's own KAFKA_*
            names |= set(service.get("environment") or {})

    assert names - KNOWN - {"DATABASE_URL", "STRIPE_API_BASE", "STRIPE_API_KEY"} == set()


def test_compose_aggregator_listens_on_all_interfaces_with_a_health_check() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    aggregator = compose["services"]["aggregator"]

    assert aggregator["environment"]["METERLINE_AGGREGATOR_HOST"] == "0.0.0.0"
    assert "/healthz" in " ".join(aggregator["healthcheck"]["test"])
    assert aggregator["labels"]["prometheus.io/scrape"] == "true"
