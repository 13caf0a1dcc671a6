"""The Helm chart (k8s/helm/spiffe-envoy-sds), rendered and linted with the real Helm.

Helm is built from the Go module proxy (helm.sh/helm/v3 v3.22.0, cmd/helm;
tests/harness/gotools.py) and skipped, with the reason, where Go is missing. Every
values file in the chart's ``ci/`` (the combinations its README documents)
is rendered for each Kubernetes version tests/deploy/test_deploy.py validates; each
object passes kubernetes-validate strictly (the Prometheus Operator's
custom resources are checked for shape), the bridge config passes the
bridge's own parser, the Envoy bootstrap passes ``envoy --mode validate``,
sidecar pods pass the same wiring checks as k8s/sidecar, and DaemonSet pods
the same as k8s/daemonset (per caller by default, issue 14), serving that
layout's consumer pod.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sds.bridge.config import parse_config
from tests.harness.envoy import CURRENT_VERSION, envoy_binary
from tests.harness.gotools import HELM, go_tool
from tests.harness.manifests import (
    K8S_VERSIONS,
    VERSION,
    Proxy,
    bridge_container,
    config_maps_of,
    k8s_proxy,
    named_container,
    pod_specs,
    render,
    wiring_problems,
)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "k8s" / "helm" / "spiffe-envoy-sds"
MONITORING = REPO / "k8s" / "monitoring"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
CRD_GROUP = "monitoring.coreos.com/"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # the first run builds helm


@dataclass
class Helm:
    binary: Path
    env: dict[str, str]

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *argv],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def template(self, *argv: str, kube: str = K8S_VERSIONS[-1]) -> list[dict[str, Any]]:
        result = self.run(
            "template", "shop", str(CHART), "--namespace", "shop", "--kube-version", kube, *argv
        )
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    binary = go_tool(*HELM)
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    return Helm(binary, env)


def test_readme_documents_exactly_the_tested_values_files() -> None:
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"`(ci/[\w.-]+-values\.yaml)`", readme))
    assert documented == {f"ci/{path.name}" for path in CI_VALUES}
    assert len(CI_VALUES) >= 6


def test_chart_copies_of_rules_and_dashboard_are_current() -> None:
    for name in ("sds-alerts.rules.yaml", "grafana-dashboard.json"):
        assert (CHART / "files" / name).read_bytes() == (MONITORING / name).read_bytes(), name


def test_helm_version_is_the_pinned_one(helm: Helm) -> None:
    # Built with plain `go install` (no release ldflags), helm says only its minor version.
    assert helm.run("version", "--short").stdout.strip() == "v3.22"
    modules = subprocess.run(
        ["go", "version", "-m", str(helm.binary)], capture_output=True, text=True, check=True
    ).stdout
    assert "\tmod\thelm.sh/helm/v3\tv3.22.0\t" in modules


def test_helm_lint_is_clean_for_every_values_file(helm: Helm) -> None:
    for values in [None, *CI_VALUES]:
        argv = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
        result = helm.run(*argv)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "1 chart(s) linted, 0 chart(s) failed" in output, output
        assert "[WARNING]" not in output and "[ERROR]" not in output, output


def node_consumer(socket_dir: str) -> tuple[Proxy, dict[str, Any]]:
    """k8s/daemonset's consumer pod, reading the node bridge's socket from ``socket_dir``.

    What the chart's NOTES ask of an Envoy pod: ``socket_dir`` mounted read-only
    at /run/sds, Envoy as uid 101, an init container waiting for the socket. Its
    bootstrap (k8s/base/envoy.yaml) also names the consumer's own
    ``upstream-peers``; of its validation contexts only ``app-callers``, which
    every ci/ values file defines, is held against the chart's policies.
    """
    objects = render("daemonset")
    maps = {name: obj for name, obj in config_maps_of(objects).items() if name == "sds-envoy"}
    pods = dict(pod_specs(objects))
    pod = copy.deepcopy(pods["Deployment/sds-demo"])
    (volume,) = [v for v in pod["volumes"] if v["name"] == "sds-socket"]
    volume["hostPath"]["path"] = socket_dir
    proxy = k8s_proxy("consumer/Deployment/sds-demo", pod, maps)
    assert proxy is not None
    assert proxy.validations == {"app-callers", "upstream-peers"}
    proxy.validations = {"app-callers"}
    return proxy, maps


def _validate_crd(obj: dict[str, Any]) -> None:
    """The Prometheus Operator objects: no schema in kubernetes-validate; check the shape."""
    kind = obj["kind"]
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert kind in ("PodMonitor", "PrometheusRule"), kind
    if kind == "PodMonitor":
        (endpoint,) = obj["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == "sds-metrics"
        assert endpoint["path"] == "/metrics"
        assert obj["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "shop"
    else:
        assert obj["spec"] == yaml.safe_load((MONITORING / "sds-alerts.rules.yaml").read_text())


@pytest.mark.parametrize("values", CI_VALUES, ids=[p.name for p in CI_VALUES])
def test_every_values_file_renders_valid_objects_for_each_kubernetes(
    helm: Helm, values: Path, tmp_path: Path
) -> None:
    given = yaml.safe_load(values.read_text())
    for kube in K8S_VERSIONS:
        objects = helm.template("-f", str(values), kube=f"{kube}.0")
        kinds = sorted(obj["kind"] for obj in objects)
        for obj in objects:
            if obj["apiVersion"].startswith(CRD_GROUP):
                _validate_crd(obj)
                continue
            try:
                kubernetes_validate.validate(obj, kube, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{values.name} {obj['kind']}/{obj['metadata']['name']} {kube}: {exc}")
    monitoring = given.get("metrics", {})
    expected = (
        {"ConfigMap", "ServiceAccount"}
        if given.get("serviceAccount", {}).get("create", True)
        else {"ConfigMap"}
    )
    expected.add("Deployment" if given["mode"] == "sidecar" else "DaemonSet")
    if given["mode"] == "sidecar":
        expected.add("Service")
    if monitoring.get("enabled", True) and monitoring.get("podMonitor", {}).get("enabled"):
        expected.add("PodMonitor")
    if monitoring.get("prometheusRule", {}).get("enabled"):
        expected.add("PrometheusRule")
    assert set(kinds) == expected

    maps = config_maps_of(objects)
    config = parse_config(
        yaml.safe_load(maps["shop-spiffe-envoy-sds-bridge"]["data"]["sds.yaml"]), "chart"
    )
    assert config.admin.host == "127.0.0.1"
    assert (config.metrics is not None) == monitoring.get("enabled", True)
    if monitoring.get("dashboard", {}).get("enabled"):
        dashboard = maps["shop-spiffe-envoy-sds-dashboard"]["data"]["spiffe-envoy-sds.json"]
        assert json.loads(dashboard) == json.loads(
            (MONITORING / "grafana-dashboard.json").read_text()
        )
    ((where, pod),) = pod_specs(objects)
    if given["mode"] == "sidecar":
        envoy_config = tmp_path / "envoy.yaml"
        envoy_config.write_text(maps["shop-spiffe-envoy-sds-envoy"]["data"]["envoy.yaml"])
        result = subprocess.run(
            [str(envoy_binary(CURRENT_VERSION)), "--mode", "validate", "-c", str(envoy_config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert yaml.safe_load(envoy_config.read_text())["admin"]["address"] == {
            "pipe": {"path": "/run/envoy/admin.sock", "mode": 0o600}
        }
        proxy = k8s_proxy(where, pod, maps)
        assert proxy is not None
        problems = wiring_problems(where, pod, proxy, maps)
        if not given.get("upstream", {}).get("csi", {}).get("enabled", True):
            csi = f"{where}: SPIFFE_ENDPOINT_SOCKET must be in a read-only csi.spiffe.io volume"
            assert csi in problems
            problems.remove(csi)
        assert problems == []
    else:
        volumes = {v["name"]: v for v in pod["volumes"]}
        daemonset = given.get("daemonset", {})
        socket_dir = daemonset.get("socketDir", "/run/spiffe-envoy-sds")
        assert volumes["sds-socket"]["hostPath"]["path"] == socket_dir
        proxy, consumer_maps = node_consumer(socket_dir)
        problems = wiring_problems(where, pod, proxy, {**maps, **consumer_maps})
        per_caller = daemonset.get("perCaller", {}).get("enabled", True)
        assert (config.per_caller is not None) == per_caller
        if per_caller:
            group = daemonset.get("perCaller", {}).get("agentGroup", 0)
            assert pod["securityContext"]["supplementalGroups"] == [group]
        if not per_caller and not given.get("upstream", {}).get("csi", {}).get("enabled", True):
            csi = f"{where}: SPIFFE_ENDPOINT_SOCKET must be in a read-only csi.spiffe.io volume"
            assert csi in problems
            problems.remove(csi)
        assert problems == []


def test_daemonset_per_caller_renders_the_kustomize_layout(helm: Helm) -> None:
    """mode: daemonset defaults to per caller, with what k8s/daemonset's bridge pod has."""
    objects = helm.template("--set", "mode=daemonset")
    ((_, pod),) = pod_specs(objects)
    kustomize = dict(pod_specs(render("daemonset")))["DaemonSet/sds-bridge"]
    assert pod["hostPID"] is kustomize["hostPID"] is True
    assert pod["securityContext"] == kustomize["securityContext"]
    assert pod["securityContext"]["supplementalGroups"] == [0]
    hostpaths = {v["name"]: v.get("hostPath") for v in pod["volumes"]}
    assert hostpaths == {v["name"]: v.get("hostPath") for v in kustomize["volumes"]}
    bridge, theirs = bridge_container(pod), bridge_container(kustomize)
    assert bridge is not None and theirs is not None
    assert "env" not in bridge and "env" not in theirs
    assert bridge["volumeMounts"] == theirs["volumeMounts"]
    assert bridge["securityContext"] == theirs["securityContext"]
    maker, their_maker = (
        named_container(pod, "sds-socket-dir"),
        named_container(kustomize, "sds-socket-dir"),
    )
    assert maker is not None and their_maker is not None
    assert maker["command"] == their_maker["command"]
    assert maker["securityContext"] == their_maker["securityContext"]
    ours = parse_config(
        yaml.safe_load(config_maps_of(objects)["shop-spiffe-envoy-sds-bridge"]["data"]["sds.yaml"]),
        "chart",
    )
    kustomized = parse_config(
        yaml.safe_load(config_maps_of(render("daemonset"))["sds-bridge"]["data"]["sds.yaml"]),
        "kustomize",
    )
    assert ours.per_caller == kustomized.per_caller
    assert ours.per_caller is not None
    assert ours.per_caller.delegated_identity_api == ("unix:///run/spire/admin/api.sock",)
    for key in ("listen", "socket_mode", "allowed_uids", "allowed_gids", "metrics", "admin"):
        assert getattr(ours, key) == getattr(kustomized, key), key


def test_agent_group_from_a_values_file_is_written_as_an_integer(
    helm: Helm, tmp_path: Path
) -> None:
    """A values file's numbers reach templates as floats; 1000000 must not become 1e+06."""
    values = tmp_path / "values.yaml"
    values.write_text("mode: daemonset\ndaemonset: {perCaller: {agentGroup: 1000000}}\n")
    ((_, pod),) = pod_specs(helm.template("-f", str(values)))
    assert pod["securityContext"]["supplementalGroups"] == [1000000]
    values.write_text("mode: daemonset\ndaemonset: {perCaller: {agentGroup: 2.5}}\n")
    result = helm.run("template", "shop", str(CHART), "--kube-version", "1.37.0", "-f", str(values))
    assert result.returncode == 1
    assert 'daemonset.perCaller.agentGroup: "2.5": want the agent\'s numeric gid' in result.stderr


def test_daemonset_shared_identity_keeps_the_workload_api(helm: Helm) -> None:
    """daemonset.perCaller.enabled false: today's layout, the bridge's identity for every Envoy."""
    objects = helm.template("--set", "mode=daemonset", "--set", "daemonset.perCaller.enabled=false")
    ((where, pod),) = pod_specs(objects)
    assert "hostPID" not in pod
    assert "supplementalGroups" not in pod["securityContext"]
    assert {v["name"] for v in pod["volumes"]} == {
        "sds-socket",
        "spiffe-workload-api",
        "sds-config",
    }
    bridge = bridge_container(pod)
    assert bridge is not None
    assert bridge["env"] == [
        {"name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix:///spiffe-workload-api/spire-agent.sock"}
    ]
    sds_yaml = yaml.safe_load(
        config_maps_of(objects)["shop-spiffe-envoy-sds-bridge"]["data"]["sds.yaml"]
    )
    assert "per_caller" not in sds_yaml
    maps = config_maps_of(objects)
    proxy, consumer_maps = node_consumer("/run/spiffe-envoy-sds")
    assert wiring_problems(where, pod, proxy, {**maps, **consumer_maps}) == []


def test_sidecar_mode_ignores_per_caller(helm: Helm) -> None:
    """perCaller belongs to the node bridge: a sidecar keeps its pod's own Workload API."""
    objects = helm.template("--set", "daemonset.perCaller.enabled=true")
    ((_, pod),) = pod_specs(objects)
    assert "hostPID" not in pod
    sds_yaml = yaml.safe_load(
        config_maps_of(objects)["shop-spiffe-envoy-sds-bridge"]["data"]["sds.yaml"]
    )
    assert "per_caller" not in sds_yaml


def test_image_defaults_to_the_chart_app_version(helm: Helm) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == chart["version"] == VERSION
    objects = helm.template()
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    images = {
        c["name"]: c["image"] for c in deployment["spec"]["template"]["spec"]["initContainers"]
    }
    assert images["sds-bridge"] == f"spiffe-envoy-sds:{VERSION}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "mode=sidecars"], 'mode: "sidecars": want sidecar or daemonset'),
        (
            ["--set", "sidecar.inbound.policy=nope"],
            'sidecar.inbound.policy: "nope" is not in policies',
        ),
        (
            ["--set", "sidecar.outbound.enabled=true", "--set", "sidecar.outbound.policy=x"],
            'sidecar.outbound.policy: "x" is not in policies',
        ),
        (
            ["--set", "mode=daemonset", "--set", "daemonset.perCaller.adminSocketDir=run/spire"],
            'daemonset.perCaller.adminSocketDir: "run/spire": want an absolute directory'
            " other than /",
        ),
        (
            ["--set", "mode=daemonset", "--set", "daemonset.perCaller.adminSocketName=a/api.sock"],
            'daemonset.perCaller.adminSocketName: "a/api.sock": want a file name in adminSocketDir',
        ),
        (
            ["--set", "mode=daemonset", "--set", "daemonset.perCaller.agentGroup=spire"],
            'daemonset.perCaller.agentGroup: "spire": want the agent\'s numeric gid',
        ),
    ],
)
def test_bad_values_stop_the_render_with_one_line(
    helm: Helm, argv: list[str], message: str
) -> None:
    result = helm.run("template", "shop", str(CHART), "--kube-version", "1.37.0", *argv)
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stdout == ""
