"""The Grafana dashboard and the Prometheus alert rules query only what a server exports.

Every PromQL expression in ``deploy/grafana/threadline.json`` and ``deploy/prometheus/alerts.yml``
is parsed (``promql-parser``, the Rust PromQL parser) and each metric it selects must appear on
the test server's ``/metrics`` after a short real workload, with every label it matches on or
groups by. The rules are also checked by Prometheus's own ``promtool``: syntax, and
``alerts_test.yml``, where each alert fires on its failure and stays quiet on a healthy instance.
Finally a real Prometheus (Debian's) scrapes the test server: every dashboard query runs on its
engine and every rule evaluates without error.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO_ROOT, Tenant, bearer, eventually, run
from threadline.config import Settings
from threadline.embedded.ports import free_port
from threadline.storage.clickhouse import ClickHouseError, clickhouse_errors, connect_clickhouse

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "threadline.json"
ALERTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
# Series Prometheus makes itself, not scraped from an instance.
SYNTHETIC = {"up"}
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"instance", "job"}
# Grafana's variables, as a query would see them with "All" selected.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}


# --- PromQL --------------------------------------------------------------------------------------


@dataclass
class Selector:
    metric: str
    labels: set[str] = field(default_factory=set)


def selectors(expr: str) -> list[Selector]:
    """Every metric an expression reads, with the labels it matches on or groups/joins by."""
    found: list[Selector] = []
    grouping: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers if m.name != "__name__"}
            assert node.name, f"a selector without a metric name in {expr!r}"
            found.append(Selector(node.name, labels))
        elif isinstance(node, promql_parser.MatrixSelector):
            walk(node.vector_selector)
        elif isinstance(node, promql_parser.AggregateExpr):
            if node.modifier is not None and node.modifier.type == promql_parser.AggModifierType.By:
                grouping.update(node.modifier.labels)
            walk(node.expr)
            if node.param is not None:
                walk(node.param)
        elif isinstance(node, promql_parser.BinaryExpr):
            matching = node.modifier.matching if node.modifier is not None else None
            if matching is not None and matching.type == promql_parser.LabelModifierType.Include:
                grouping.update(matching.labels)
            walk(node.lhs)
            walk(node.rhs)
        elif isinstance(node, promql_parser.Call):
            for arg in node.args:
                walk(arg)
        elif isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
            walk(node.expr)
        else:
            assert isinstance(node, (promql_parser.NumberLiteral, promql_parser.StringLiteral)), node

    walk(promql_parser.parse(expr))
    # "by (le, route)" and "on (instance)" name labels of the series underneath: each must be a
    # label of at least one selected metric (or le, which histogram buckets carry).
    for selector in found:
        selector.labels |= {"__grouping__:" + label for label in grouping}
    return found


def test_selectors_finds_metrics_and_labels_in_nested_expressions() -> None:
    found = selectors(
        'histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{method="GET"}[5m])))'
        ' / on (instance) (b > 1) and absent(c{x="y"})'
    )
    assert [s.metric for s in found] == ["a_bucket", "b", "c"]
    assert {"method", "__grouping__:le", "__grouping__:route", "__grouping__:instance"} <= found[0].labels
    assert "x" in found[2].labels
    with pytest.raises(ValueError, match="unclosed left parenthesis"):
        promql_parser.parse("sum(rate(a[5m])")


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unknown Grafana variable in {target['expr']!r}"
            exprs.append(expr)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            assert query.startswith("label_values(")
            assert query.endswith(")")
            exprs.append(query.removeprefix("label_values(").rsplit(",", 1)[0])
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


# --- /metrics after a workload -------------------------------------------------------------------


def exported(text: str) -> dict[str, set[str] | None]:
    """Every series name on /metrics -> its label names (None: declared, no series yet)."""
    names: dict[str, set[str] | None] = {}
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_count", "_sum", "_created"]}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = names.setdefault(sample.name, set())
            assert labels is not None
            labels.update(sample.labels)
        if not family.samples:  # a labelled metric nothing has happened to yet
            for suffix in suffixes.get(family.type, [""]):
                names.setdefault(family.name + suffix, None)
    return names


@pytest.fixture(scope="module")
def metrics_after_workload(base_url: str, tenant: Tenant) -> dict[str, set[str] | None]:
    """/metrics after one of everything the dashboard shows: session writes, appends, an SSE
    reader and a long-poll that receive records, lists and counts, a 404."""
    with httpx.Client(base_url=base_url, headers=bearer(tenant.key), timeout=60) as client:
        session = client.post("/api/v1/sessions", json={"type": "dashboard"}).json()
        channel = f"/realtime/v1/sessions/{session['id']}/out"
        assert client.post(f"{channel}/append", json={"text": "hi"}).status_code == 200
        with client.stream("GET", channel, params={"offset": "-1"}) as sse:
            assert sse.status_code == 200
            assert any(line.startswith("data:") for line in sse.iter_lines())  # the first record
        stream = "/v1/stream/dashboard-long-poll"
        assert client.put(stream, headers={"Content-Type": "text/plain"}).status_code == 201
        assert client.post(stream, content=b"x", headers={"Content-Type": "text/plain"}).status_code == 204
        poll = client.get(stream, params={"offset": "-1", "live": "long-poll"})
        assert poll.status_code == 200, poll.text
        # Lists are served by ClickHouse once the mirror holds this session; both sources count.
        eventually(
            lambda: client.get("/api/v1/sessions", params={"filter[type]": "dashboard"}).json()["data"]
        )
        assert client.get("/api/v1/sessions/count").status_code == 200
        assert client.get("/api/v1/sessions/session_00000000000000000000000000").status_code == 404
        text = client.get("/metrics").text
    return exported(text)


def _check_exported(expr: str, metrics: dict[str, set[str] | None]) -> list[str]:
    problems: list[str] = []
    chosen = selectors(expr)
    grouping = {
        label.split(":", 1)[1] for s in chosen for label in s.labels if label.startswith("__grouping__:")
    }
    known_labels: set[str] = set(TARGET_LABELS)
    for selector in chosen:
        if selector.metric in SYNTHETIC:
            known_labels |= {"instance", "job"}
            continue
        if selector.metric not in metrics:
            problems.append(f"{selector.metric} is not on /metrics ({expr})")
            continue
        labels = metrics[selector.metric]
        if labels is None:
            continue  # declared with labels, no series yet: its labels cannot be checked here
        known_labels |= labels
        matched = {label for label in selector.labels if not label.startswith("__grouping__:")}
        unknown = matched - labels - TARGET_LABELS
        if unknown:
            problems.append(f"{selector.metric} has no label {sorted(unknown)} ({expr})")
    if all(metrics.get(s.metric) is not None or s.metric in SYNTHETIC for s in chosen):
        unknown_grouping = grouping - known_labels
        if unknown_grouping:
            problems.append(f"grouping by {sorted(unknown_grouping)}, which no selected metric has ({expr})")
    return problems


def test_every_dashboard_query_reads_metrics_the_server_exports(
    metrics_after_workload: dict[str, set[str] | None],
) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 30
    problems = [problem for expr in exprs for problem in _check_exported(expr, metrics_after_workload)]
    assert not problems, "\n".join(problems)


def test_every_alert_reads_metrics_the_server_exports(
    metrics_after_workload: dict[str, set[str] | None],
) -> None:
    rules = alert_rules()
    assert len(rules) >= 10
    problems = [p for rule in rules for p in _check_exported(rule["expr"], metrics_after_workload)]
    assert not problems, "\n".join(problems)


def test_a_misspelled_metric_or_label_is_reported(metrics_after_workload: dict[str, set[str] | None]) -> None:
    """The check itself can fail: a typo in a metric or a label name is caught."""
    assert _check_exported("rate(threadline_http_request_total[1m])", metrics_after_workload)
    assert _check_exported('threadline_http_requests_total{path="/x"}', metrics_after_workload)
    assert _check_exported("sum by (path) (threadline_http_requests_total)", metrics_after_workload)
    assert not _check_exported(
        "sum by (route) (rate(threadline_http_requests_total[1m]))", metrics_after_workload
    )


def test_the_dashboard_covers_what_operators_watch() -> None:
    """Each area of issue 19's list has a panel that reads its metric."""
    read = {s.metric for expr in dashboard_exprs() for s in selectors(expr)}
    for metric in [
        "threadline_http_requests_total",
        "threadline_http_request_duration_seconds_bucket",
        "threadline_stream_appends_total",
        "threadline_stream_flush_seconds_bucket",
        "threadline_live_readers",
        "threadline_live_records_delivered_total",
        "threadline_replication_lag_seconds",
        "threadline_replication_retained_wal_bytes",
        "threadline_replication_safe_wal_bytes",
        "threadline_session_list_duration_seconds_count",
        "threadline_session_list_duration_seconds_bucket",
        "threadline_dependency_errors_total",
        "threadline_sse_readers_dropped_total",
    ]:
        assert metric in read, metric
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    datasource = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert datasource == datasource | {"type": "datasource", "query": "prometheus"}
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def _sample(text: str, name: str, **labels: str) -> float:
    """A series' value; 0 for a labelled series not created yet (nothing counted so far)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
        if family.name == name.removesuffix("_total").removesuffix("_count"):
            return 0.0
    raise AssertionError(f"no metric {name} on /metrics")


def test_live_readers_deliveries_and_list_sources_count_real_traffic(base_url: str, tenant: Tenant) -> None:
    with httpx.Client(base_url=base_url, headers=bearer(tenant.key), timeout=60) as client:
        before = client.get("/metrics").text
        session = client.post("/api/v1/sessions", json={"type": "dashboard-counts"}).json()
        channel = f"/realtime/v1/sessions/{session['id']}/in"
        assert client.post(f"{channel}/append", json=[{"n": 1}, {"n": 2}, {"n": 3}]).status_code == 200
        with client.stream("GET", channel, params={"offset": "-1"}) as sse:
            data = 0
            for line in sse.iter_lines():
                data += line.startswith("data:")
                if data == 3:
                    during = client.get("/metrics").text
                    break
        assert _sample(during, "threadline_live_readers", mode="sse") >= 1
        assert client.get("/api/v1/sessions", params={"filter[type]": "dashboard-counts"}).status_code == 200
        after = client.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert delta("threadline_live_records_delivered_total", mode="sse") >= 3
    served = sum(
        delta("threadline_session_list_duration_seconds_count", kind="list", source=source)
        for source in ("clickhouse", "postgres")
    )
    assert served >= 1


def test_a_refused_clickhouse_query_is_counted(settings: Settings, base_url: str) -> None:
    def refused() -> float:
        text = httpx.get(f"{base_url}/metrics", timeout=30).text
        return _sample(text, "threadline_dependency_errors_total", dependency="clickhouse", kind="refused")

    before = refused()

    async def bad_query() -> None:
        client = await connect_clickhouse(settings.clickhouse_url)
        try:
            with clickhouse_errors("running a query that cannot work"):
                await client.query("SELECT no_such_function_in_clickhouse()")
        finally:
            await client.close()

    with pytest.raises(ClickHouseError):
        run(bad_query())
    assert refused() >= before + 1


# --- promtool ------------------------------------------------------------------------------------


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not Path(PROMTOOL).exists():
        pytest.fail("promtool is missing: apt-get install prometheus (.ci/run does)")
    return subprocess.run(
        [PROMTOOL, *args], cwd=ALERTS.parent, capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_accepts_the_rules_and_the_prometheus_config() -> None:
    rules = _promtool("check", "rules", ALERTS.name)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_each_alert_fires_on_its_failure_and_not_on_a_healthy_instance() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = yaml.safe_load((ALERTS.parent / "alerts_test.yml").read_text())
    firing = {
        case["alertname"]
        for test in tested["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    quiet = {
        case["alertname"]
        for test in tested["tests"]
        for case in test["alert_rule_test"]
        if not case["exp_alerts"]
    }
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts <= firing, f"alerts never shown to fire: {sorted(alerts - firing)}"
    critical = {rule["alert"] for rule in alert_rules() if rule["labels"]["severity"] == "critical"}
    assert critical <= quiet, f"critical alerts never shown quiet: {sorted(critical - quiet)}"


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    """What the promtool tests rely on: it fails on a bad expression."""
    if not Path(PROMTOOL).exists():
        pytest.fail("promtool is missing: apt-get install prometheus (.ci/run does)")
    broken = tmp_path / "broken.yml"
    broken.write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "sum(rate(x[5m])"}]}]})
    )
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(broken)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode != 0


# --- a real Prometheus scraping the test server ------------------------------------------------

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def _query(url: str, expr: str) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30).json()
    return answer


@pytest.fixture(scope="module")
def prometheus(
    base_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    metrics_after_workload: dict[str, set[str] | None],
) -> Iterator[str]:
    """Debian's Prometheus scraping the test server every second, with the alert rules loaded
    (after the workload, so the server has something of everything to show)."""
    if not Path(PROMETHEUS).exists():
        pytest.fail("prometheus is missing: apt-get install prometheus (.ci/run does)")
    directory = tmp_path_factory.mktemp("prometheus")
    target = httpx.URL(base_url)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "threadline", "static_configs": [{"targets": [f"{target.host}:{target.port}"]}]}
        ],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (directory / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def scraped_enough() -> bool:
        assert process.poll() is None, (directory / "prometheus.log").read_text()
        try:
            # Until its storage is open Prometheus answers 503 in plain text.
            if httpx.get(f"{url}/-/ready", timeout=30).status_code != 200:
                return False
            # rate() needs two samples in its window; a few more make every window hold some.
            result = _query(url, 'count_over_time(up{job="threadline"}[1m]) >= 5 and up == 1')
        except httpx.TransportError:
            return False
        return bool(result["data"]["result"])

    try:
        eventually(scraped_enough, timeout=180, interval=1)
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def test_every_dashboard_query_runs_on_a_real_prometheus(prometheus: str) -> None:
    """Prometheus's own engine accepts each query over real scraped series, and the panels of
    the things a running server always has (requests, live readers, the mirror's leader flag,
    dependency errors at 0, the scrape itself) show data."""
    empty = []
    for expr in dashboard_exprs():
        answer = _query(prometheus, expr.replace("[1m]", "[30s]"))
        assert answer["status"] == "success", (expr, answer)
        if not answer["data"]["result"]:
            empty.append(expr)
    for metric in [
        "up",
        "threadline_http_requests_total",
        "threadline_live_readers",
        "threadline_replication_leader",
        "threadline_dependency_errors_total",
        "process_resident_memory_bytes",
    ]:
        reading = [expr for expr in dashboard_exprs() if metric in {s.metric for s in selectors(expr)}]
        assert reading, metric
        assert any(expr not in empty for expr in reading), f"no panel reading {metric} shows data"


def test_the_alert_rules_load_and_evaluate_on_a_real_prometheus(prometheus: str) -> None:
    def all_evaluated() -> list[dict[str, Any]] | None:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=30).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule["health"] != "unknown" for rule in rules) else None

    rules = eventually(all_evaluated, timeout=60, interval=1)
    assert {rule["name"] for rule in rules} == {rule["alert"] for rule in alert_rules()}
    broken = [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"]
    assert not broken


# --- the guide -----------------------------------------------------------------------------------

GUIDE = REPO_ROOT / "docs" / "production.md"


def test_the_production_guide_lists_every_threadline_metric(
    metrics_after_workload: dict[str, set[str] | None],
) -> None:
    guide = GUIDE.read_text()
    missing = set()
    for name in metrics_after_workload:
        if not name.startswith("threadline_"):
            continue
        base = re.sub(r"_(total|created|bucket|count|sum)$", "", name)
        if f"`{base}" not in guide:
            missing.add(base)
    assert not missing, f"not in docs/production.md#metrics: {sorted(missing)}"


def test_the_production_guide_links_to_files_that_exist() -> None:
    links = re.findall(r"\]\((\.\./[^)#]+|[a-z]+\.md)(?:#[^)]*)?\)", GUIDE.read_text())
    assert any("deploy/k8s" in link for link in links)
    for link in links:
        assert (GUIDE.parent / link).resolve().exists(), link
