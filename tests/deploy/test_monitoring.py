"""What operators scrape and alert on: k8s/monitoring/ checked with real tools and a live bridge.

* ``sds-alerts.rules.yaml``: the real ``promtool check rules`` and ``promtool
  test rules`` (``sds-alerts.test.yaml`` has a unit test for each alert), and
  a mutated copy that the unit tests must catch.
* ``grafana-dashboard.json`` and the rules: every metric name a query uses is
  one a live bridge (with a real Envoy connected) exports on its metrics
  listener.
* ``podmonitor.yaml``: scrapes the named port the manifests give the
  metrics listener, at /metrics.

promtool is built from the Go module proxy (tests/harness/gotools.py); without Go
those tests skip and say why.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Processes, wait_for
from tests.harness.envoy import Envoys, bootstrap, downstream_mtls_listener, sds_cluster
from tests.harness.gotools import PROMTOOL, go_tool
from tests.harness.metrics_listener import metrics_port, scrape_get
from tests.harness.stack import Stack

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "k8s" / "monitoring"
RULES = MONITORING / "sds-alerts.rules.yaml"
RULE_TESTS = MONITORING / "sds-alerts.test.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERTS = {
    "SdsSvidExpiringSoon",
    "SdsBridgeNotReady",
    "SdsUpstreamDisconnected",
    "SdsNacksRising",
    "SdsNoEnvoyConnected",
}
# Labelled series that exist only after their event (a NACK, a rotation, an
# upstream error): a fresh bridge declares them (# HELP) without samples.
EVENT_ONLY = {
    "sds_unservable",
    "sds_nacks_total",
    "sds_svid_rotations_total",
    "sds_svid_last_rotation_timestamp_seconds",
    "sds_upstream_errors_total",
}


@pytest.fixture(scope="session")
def promtool() -> Path:
    return go_tool(*PROMTOOL)


def _promtool(binary: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), *argv], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_alert_rules_pass_promtool_check(promtool: Path) -> None:
    result = _promtool(promtool, "check", "rules", RULES.name, cwd=MONITORING)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_every_alert_passes_its_promtool_unit_test(promtool: Path) -> None:
    rules = yaml.safe_load(RULES.read_text())
    assert {rule["alert"] for g in rules["groups"] for rule in g["rules"]} == ALERTS
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == ALERTS  # each alert is shown firing, not only quiet
    result = _promtool(promtool, "test", "rules", RULE_TESTS.name, cwd=MONITORING)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_promtool_catches_a_broken_rule_and_a_wrong_threshold(
    promtool: Path, tmp_path: Path
) -> None:
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    text = RULES.read_text()
    (tmp_path / RULES.name).write_text(text.replace("sds_ready == 0", "sds_ready == = 0"))
    result = _promtool(promtool, "check", "rules", RULES.name, cwd=tmp_path)
    assert result.returncode == 1
    assert "SdsBridgeNotReady" in result.stdout + result.stderr or "parse error" in (
        result.stdout + result.stderr
    )
    (tmp_path / RULES.name).write_text(text.replace("< 15 * 60", "< 5 * 60"))
    result = _promtool(promtool, "test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode == 1
    assert "alertname: SdsSvidExpiringSoon" in result.stdout + result.stderr


# --------------------------------------------------------------------------- metric names

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels and keywords removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match.group() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(sds_push_latency_seconds_bucket{job=~"$job"}'
        "[$__rate_interval]))) / on (instance) group_left sds_ready unless sds_streams offset 5m"
    )
    assert metric_names(expr) == {"sds_push_latency_seconds_bucket", "sds_ready", "sds_streams"}
    assert metric_names("(sds_svid_not_after_seconds - time()) < 15 * 60") == {
        "sds_svid_not_after_seconds"
    }


def dashboard_queries() -> list[str]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*), \w+\)", variable["definition"])
            assert inner, variable["definition"]
            queries.append(inner.group(1))
    return queries


def exposition_names(text: str) -> tuple[set[str], set[str]]:
    """(names with samples, names only declared by # HELP) in Prometheus text exposition."""
    samples = {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    # prometheus_client's *_created series (creation times) are not for dashboards.
    samples = {name for name in samples if not name.endswith("_created")}
    declared = {
        line.split()[2]
        for line in text.splitlines()
        if line.startswith("# HELP ") and not line.split()[2].endswith("_created")
    }
    histograms = {name for name in declared if f"{name}_count" in samples}
    return samples, declared - samples - histograms


def test_every_dashboard_and_alert_query_uses_metrics_a_live_bridge_exports(
    procs: Processes, sockdir: Path, envoys: Envoys
) -> None:
    stack = Stack(procs, sockdir)
    stack.write_config(metrics="127.0.0.1:0")
    stack.start_provider()
    stack.start_bridge()
    port = metrics_port(procs, stack)
    # A real Envoy holding a stream, so the per-Envoy series exist.
    listener = downstream_mtls_listener("in")
    envoys.start(bootstrap("dash", "dash", [listener], [sds_cluster("sds", stack.sds_socket)]))

    def scraped() -> str | None:
        status, body = scrape_get(port, "/metrics")
        text = body.decode()
        return text if status == 200 and "sds_envoy_acked_info{" in text else None

    text = wait_for(scraped, 20, "a scrape with the Envoy's ACK")
    samples, declared_only = exposition_names(text)
    assert declared_only <= EVENT_ONLY
    used: dict[str, set[str]] = {}
    queries = dashboard_queries()
    assert len(queries) >= 15
    rules = yaml.safe_load(RULES.read_text())
    queries += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    for query in queries:
        names = metric_names(query)
        assert names, query
        for name in names:
            used.setdefault(name, set()).add(query)
    unknown = {name: q for name, q in used.items() if name not in samples | declared_only}
    assert unknown == {}
    # The dashboard covers what the bridge exports, not a sample of it.
    assert (samples | declared_only) - set(used) == set()


# --------------------------------------------------------------------------- scrape config


def test_podmonitor_scrapes_the_named_metrics_port_only() -> None:
    pod_monitor, service_monitor = yaml.safe_load_all((MONITORING / "podmonitor.yaml").read_text())
    assert pod_monitor["kind"] == "PodMonitor"
    assert service_monitor["kind"] == "ServiceMonitor"
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "sds-metrics"
    assert endpoint["path"] == "/metrics"
    assert [e["port"] for e in service_monitor["spec"]["endpoints"]] == ["sds-metrics"]


def test_shipped_bridges_expose_the_metrics_listener_on_the_scraped_port() -> None:
    from sds.bridge.config import MetricsConfig, parse_config
    from tests.harness.manifests import pod_containers, pod_specs, render

    for overlay in ("sidecar", "daemonset"):
        objects = render(overlay)
        configs = [o for o in objects if o["kind"] == "ConfigMap" and "sds.yaml" in o["data"]]
        (config_map,) = configs
        config = parse_config(yaml.safe_load(config_map["data"]["sds.yaml"]), overlay)
        assert config.metrics == MetricsConfig("0.0.0.0", 9102), overlay
        assert config.admin.host == "127.0.0.1"
        bridges = [
            c
            for _, pod in pod_specs(objects)
            for c in pod_containers(pod)
            if c.get("args", [])[:1] == ["run"]
        ]
        assert bridges, overlay
        for bridge in bridges:
            ports = {p["name"]: p["containerPort"] for p in bridge.get("ports", [])}
            assert ports == {"sds-metrics": 9102}, (overlay, bridge["name"])
