"""The deployment files fit together: docker-compose.yml with its Prometheus and Grafana
provisioning, and the Kubernetes manifests in deploy/k8s.

CI has no Docker engine and no Kubernetes cluster, so what can be checked without them is:
compose's mounts name files that exist and land where the configs expect them, Prometheus scrapes
the compose service that runs Threadline on its port, Grafana's datasource is that Prometheus and
its dashboard provider loads the mounted dashboard; every manifest is valid against the
Kubernetes API schemas (``kubernetes-validate``, schemas bundled in the package, no network),
strictly (an unknown field fails), and the manifests agree with each other and with the server
(selectors, probe paths answered by a real server, every setting a real ``THREADLINE_*`` one).
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO_ROOT, clickhouse_rows
from threadline.config import Settings
from threadline.embedded.stack import StackEndpoints
from threadline.streams.collector import RECORD_PREFIXES

COMPOSE = REPO_ROOT / "docker-compose.yml"
K8S = REPO_ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest release still in upstream support when this was written


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = _yaml(COMPOSE)
    return document


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> repository file for the service's bind mounts of repository files."""
    found: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            found[target] = REPO_ROOT / source
    return found


def _published(service: dict[str, Any]) -> dict[int, int]:
    """Container port -> host port."""
    ports = {}
    for mapping in service.get("ports", []):
        parts = str(mapping).split(":")  # [ip:]host:container, or container alone
        ports[int(parts[-1])] = int(parts[-2] if len(parts) > 1 else parts[-1])
    return ports


def test_compose_mounts_existing_files_where_prometheus_and_grafana_read_them(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name, service in services.items():
        for target, source in _mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"

    prometheus = services["prometheus"]
    mounts = _mounts(prometheus)
    config_arg = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_path = config_arg.split("=", 1)[1]
    assert config_path in mounts, "the config Prometheus is told to read is not mounted"
    config = _yaml(mounts[config_path])
    for rule_file in config["rule_files"]:
        in_container = str(PurePosixPath(config_path).parent / rule_file)
        assert in_container in mounts, f"rule file {rule_file} is not mounted at {in_container}"
        assert mounts[in_container] == REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
    assert ":" in prometheus["image"]
    assert 9090 in _published(prometheus)

    grafana = services["grafana"]
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning/datasources"].is_dir()
    assert mounts["/etc/grafana/provisioning/dashboards"].is_dir()
    assert ":" in grafana["image"]
    assert 3000 in _published(grafana)


def test_prometheus_scrapes_the_threadline_service_on_its_port(compose: dict[str, Any]) -> None:
    services = compose["services"]
    config = _yaml(_mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["threadline"]  # the dashboard and the alerts select job="threadline"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    port = int(services["threadline"].get("environment", {}).get("THREADLINE_PORT", Settings().port))
    assert port in _published(services["threadline"])
    targets: list[tuple[str, int]] = []
    for discovery in job.get("dns_sd_configs", []):
        targets += [(name, int(discovery["port"])) for name in discovery["names"]]
    for static in job.get("static_configs", []):
        for target in static["targets"]:
            host, target_port = target.rsplit(":", 1)
            targets.append((host, int(target_port)))
    assert targets
    for host, target_port in targets:
        assert host in services, f"scrape target {host} is not a compose service"
        assert (host, target_port) == ("threadline", port)


def test_grafana_reads_the_compose_prometheus_and_loads_the_mounted_dashboard(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    grafana = services["grafana"]
    mounts = _mounts(grafana)
    datasources_dir = mounts["/etc/grafana/provisioning/datasources"]
    datasources = [d for f in sorted(datasources_dir.glob("*.yml")) for d in _yaml(f)["datasources"]]
    assert len(datasources) == 1
    datasource = datasources[0]
    assert datasource["type"] == "prometheus"
    assert datasource["isDefault"] is True  # the dashboard's datasource variable picks the default
    url = httpx.URL(datasource["url"])
    assert url.host in services
    assert url.host == "prometheus"
    assert url.port in _published(services[url.host])

    dashboards_dir = mounts["/etc/grafana/provisioning/dashboards"]
    providers = [p for f in sorted(dashboards_dir.glob("*.yml")) for p in _yaml(f)["providers"]]
    assert len(providers) == 1
    path = PurePosixPath(providers[0]["options"]["path"])
    dashboards = {target: source for target, source in mounts.items() if PurePosixPath(target).parent == path}
    assert dashboards == {str(path / "threadline.json"): REPO_ROOT / "deploy" / "grafana" / "threadline.json"}
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home in dashboards
    assert json.loads(dashboards[home].read_text())["uid"] == "threadline-overview"


# --- Kubernetes ----------------------------------------------------------------------------------


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            found.append((path, document))
    return found


def _kind(kind: str) -> dict[str, Any]:
    matching = [document for _, document in _manifests() if document["kind"] == kind]
    assert len(matching) == 1, kind
    return matching[0]


def test_every_manifest_is_valid_against_the_kubernetes_schemas() -> None:
    manifests = _manifests()
    assert {document["kind"] for _, document in manifests} >= {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
        "Job",
        "Ingress",
    }
    for path, document in manifests:
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {exc}")
    kustomization = _yaml(K8S / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted({path.name for path, _ in manifests})


def test_the_schema_check_rejects_a_misspelled_or_mistyped_field() -> None:
    """What the check above relies on: strict validation fails on what kubectl would refuse."""
    deployment = _kind("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    misspelled = {**container, "readinesProbe": container["readinessProbe"]}
    mistyped = {**container, "ports": [{"containerPort": "eighty"}]}
    for bad in (misspelled, mistyped):
        broken = json.loads(json.dumps(deployment))
        broken["spec"]["template"]["spec"]["containers"][0] = bad
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_manifests_agree_with_each_other_and_with_the_server(base_url: str) -> None:
    deployment = _kind("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = _kind("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pdb = _kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert deployment["spec"]["replicas"] > pdb["spec"]["maxUnavailable"]
    ingress = _kind("Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {port["name"] for port in service["spec"]["ports"]}

    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= set(ports)
    # The probes ask a real server: /healthz and /readyz answer 200 on a healthy stack.
    probes = {
        name: container[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["port"] in ports
        assert httpx.get(base_url + probe["path"], timeout=30).status_code == 200, probe

    # Every variable the pods get is a setting the server reads, from objects in this set.
    config_map = _kind("ConfigMap")
    secret = _kind("Secret")
    sources = {ref[key]["name"] for ref in container["envFrom"] for key in ref}
    assert sources == {config_map["metadata"]["name"], secret["metadata"]["name"]}
    migrate = _kind("Job")["spec"]["template"]["spec"]["containers"][0]
    assert migrate["envFrom"] == container["envFrom"]
    assert migrate["command"] == ["threadline", "migrate"]
    known = {f"THREADLINE_{name.upper()}" for name in Settings.model_fields}
    variables = set(config_map["data"]) | set(secret["stringData"])
    assert variables <= known, sorted(variables - known)
    assert {"THREADLINE_DATABASE_URL", "THREADLINE_CLICKHOUSE_URL", "THREADLINE_S3_SECRET_ACCESS_KEY"} <= set(
        secret["stringData"]
    )
    assert config_map["data"]["THREADLINE_PORT"] == str(ports["http"])
    assert config_map["data"]["THREADLINE_HOST"] == "0.0.0.0"


# --- ClickHouse cluster DDL and S3 lifecycle -----------------------------------------------------

CLUSTER_SQL = REPO_ROOT / "deploy" / "clickhouse" / "cluster.sql"
_COLUMN = re.compile(r"^\s+([a-z_]+)\s+(.+?)(?:\s+DEFAULT\s.*?|\s+COMMENT\s.*?)*,?$")


def _cluster_tables() -> dict[str, dict[str, Any]]:
    """Each CREATE TABLE in cluster.sql: its columns (name -> type), engine and keys."""
    tables: dict[str, dict[str, Any]] = {}
    for statement in CLUSTER_SQL.read_text().split(";"):
        match = re.search(r"CREATE TABLE IF NOT EXISTS (\w+) ON CLUSTER", statement)
        if match is None:
            continue
        body = statement[statement.index("(") + 1 : statement.index("\n)")]
        columns = {}
        for line in body.splitlines():
            if line.strip() and not line.strip().startswith("INDEX"):
                column = _COLUMN.match(line)
                assert column is not None, line
                columns[column.group(1)] = column.group(2)
        tables[match.group(1)] = {
            "columns": columns,
            "engine": re.search(r"ENGINE = (\w+)", statement).group(1),  # type: ignore[union-attr]
            "order": re.search(r"ORDER BY \(?([^)\n]+)\)?", statement).group(1),  # type: ignore[union-attr]
            "indexes": set(re.findall(r"INDEX (\w+)", statement)),
        }
    return tables


def test_the_clickhouse_cluster_tables_match_what_the_schema_files_create(
    stack: StackEndpoints, base_url: str
) -> None:
    """cluster.sql must stay the same table as clickhouse_schema/ builds (read from the real
    ClickHouse the test server migrated), replicated: a column missing there would make every
    replication batch fail on a cluster."""
    tables = _cluster_tables()
    assert set(tables) == {"sessions_v1", "replication_state"}
    for name, table in tables.items():
        assert table["engine"] == "ReplicatedReplacingMergeTree"
        described = clickhouse_rows(
            stack,
            "SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = {t:String}"
            " ORDER BY position",
            t=name,
        )
        assert [(column, kind) for column, kind in described] == list(table["columns"].items()), name
        sorting_key, engine_full = clickhouse_rows(
            stack,
            "SELECT sorting_key, engine_full FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
            t=name,
        )[0]
        assert sorting_key == table["order"]
        assert "ReplacingMergeTree" in engine_full
        indexes = clickhouse_rows(
            stack,
            "SELECT name FROM system.data_skipping_indices WHERE database = currentDatabase() AND table = {t:String}",
            t=name,
        )
        assert {index for (index,) in indexes} == table["indexes"]


def test_s3_lifecycle_rules_never_expire_live_record_objects() -> None:
    """Records live under batches/ and segments/ for as long as their streams do, and an orphan
    there looks like any other object: only Threadline's sweep may delete them. The rules may
    clean up what Threadline already deleted (noncurrent versions) and abandoned uploads."""
    rules = json.loads((REPO_ROOT / "deploy" / "s3" / "lifecycle.json").read_text())["Rules"]
    assert rules
    for rule in rules:
        prefix = rule["Filter"].get("Prefix", "")
        expiration = rule.get("Expiration", {})
        expires_current = "Days" in expiration or "Date" in expiration
        for record_prefix in RECORD_PREFIXES:
            if record_prefix.startswith(prefix) or prefix.startswith(record_prefix):
                assert not expires_current, rule["ID"]
                assert "Transitions" not in rule, rule["ID"]  # archive tiers are not readable at once
    assert any("NoncurrentVersionExpiration" in rule for rule in rules)


def test_the_pods_run_as_the_images_own_user() -> None:
    """runAsNonRoot needs a numeric USER in the image to check; the manifests use the same ids."""
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    assert user is not None, "the Dockerfile's USER must be numeric uid:gid"
    assert f"--uid {user.group(1)} --gid {user.group(2)}" in dockerfile
    for kind in ("Deployment", "Job"):
        context = _kind(kind)["spec"]["template"]["spec"]["securityContext"]
        assert context["runAsNonRoot"] is True
        assert (str(context["runAsUser"]), str(context["runAsGroup"])) == user.groups(), kind
