"""The Kubernetes sidecar pod, really started: k8s/sidecar run with ``podman kube play``.

What podman cannot do the way a cluster does is substituted, and each
substitution is stated here and in docs/deploy.md:

* the SPIFFE CSI driver does not exist: its volume becomes a hostPath of the
  directory where the embedded provider (``sds workload-api``, standing in
  for the SPIRE agent) serves the Workload API, attesting the bridge by uid
  and gid as the agent would by pod;
* images cannot be pulled: ours and Envoy (from its wheel) are built here,
  the app is a local stand-in for http-echo (kustomize's ``images:`` does
  the same in a real overlay);
* podman 4.3 does not run native sidecars (an init container with
  ``restartPolicy: Always`` would block the pod), so the bridge runs as a
  regular container; Envoy retries the socket until the bridge binds it;
* init containers run with podman's "always" type (kept after they exit):
  podman 4.3 races removing a "once" init container that has just exited;
* there is no Service DNS: a hostAlias points ``sds-demo`` (the egress
  cluster's address) at the pod itself, so the app calls its own mTLS
  ingress through its own egress, both sides presenting the pod's SVID;
* podman runs no readiness or startup probes: the test runs each probe's
  command itself (exec probes with ``podman exec``, httpGet probes from a
  container in the pod's network namespace).

Teardown is ``podman kube down`` with the same YAML (plus the volumes podman
made from the ConfigMaps, which its ``kube down`` keeps); nothing may remain.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import containers
from tests.harness.containers import Podman
from tests.harness.manifests import render
from tests.harness.procs import wait_for

REPO = Path(__file__).resolve().parents[2]
TRUST_DOMAIN = "example.org"
POD_ID = f"spiffe://{TRUST_DOMAIN}/ns/sds-demo/sa/sds-demo"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

IDENTITIES = """\
kind: workload_identity
version: v1
metadata:
  name: sds-demo
  description: the sidecar pod's bridge, as the SPIRE agent would attest it
spec:
  spiffe:
    id: /ns/sds-demo/sa/sds-demo
  rules:
    allow:
      - conditions:
          - attribute: workload.unix.uid
            eq:
              value: 10001
          - attribute: workload.unix.gid
            eq:
              value: 101
"""


@pytest.fixture(scope="session")
def tool() -> Podman:
    return containers.podman()


def podman_objects(images: dict[str, str], workload_dir: Path, name: str) -> list[dict[str, Any]]:
    """The rendered k8s/sidecar objects podman can play, with the substitutions above."""
    objects = [o for o in render("sidecar") if o["kind"] in ("ConfigMap", "Deployment")]
    out = []
    for obj in copy.deepcopy(objects):
        if obj["kind"] == "Deployment":
            obj["metadata"]["name"] = name
            obj["spec"]["replicas"] = 1
            pod = obj["spec"]["template"]["spec"]
            pod["hostAliases"] = [{"ip": "127.0.0.1", "hostnames": ["sds-demo"]}]
            # podman 4.3 races removing a "once" init container that has just
            # exited ("cannot remove container ... as it is running"); "always"
            # init containers are kept, and run again only if the pod restarts.
            for meta in (obj["metadata"], obj["spec"]["template"]["metadata"]):
                annotations = meta.setdefault("annotations", {})
                annotations["io.podman.annotations.init.container.type"] = "always"
            init = pod["initContainers"]
            sidecars = [c for c in init if c.get("restartPolicy") == "Always"]
            for container in sidecars:
                init.remove(container)
                del container["restartPolicy"]
                del container["startupProbe"]  # run by the test instead
                pod["containers"].insert(0, container)
            for container in [*init, *pod["containers"]]:
                repository = container["image"].split(":")[0]
                container["image"] = images.get(repository, container["image"])
            for volume in pod["volumes"]:
                if "csi" in volume:
                    del volume["csi"]
                    volume["hostPath"] = {"path": str(workload_dir), "type": "Directory"}
        out.append(obj)
    return out


@pytest.fixture
def workload_api(tool: Podman) -> Iterator[Path]:
    """The embedded provider in a container, serving spire-agent.sock in a host directory."""
    image = containers.sds_image(tool)
    directory = Path(tempfile.mkdtemp(prefix="sds-kube-", dir="/tmp"))
    os.chown(directory, 10001, 10001)
    os.chmod(directory, 0o755)
    (directory / "identities.yaml").write_text(IDENTITIES)
    name = f"sds-kube-provider-{uuid.uuid4().hex[:8]}"
    tool.run(
        "run",
        "--detach",
        "--name",
        name,
        "--read-only",
        "--cap-drop",
        "ALL",
        "--network",
        "none",
        "--user",
        "10001:10001",
        "-v",
        f"{directory}:/spiffe-workload-api",
        image,
        "workload-api",
        "--socket=/spiffe-workload-api/spire-agent.sock",
        f"--trust-domain={TRUST_DOMAIN}",
        "--identities=/spiffe-workload-api/identities.yaml",
        "--ephemeral",
    )
    try:
        deadline = time.monotonic() + 60
        while not (directory / "spire-agent.sock").exists():
            assert time.monotonic() < deadline, tool.run("logs", name, check=False).stderr
            time.sleep(0.5)
        yield directory
    finally:
        tool.run("rm", "--force", "--time", "2", name, check=False)
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


def test_sidecar_pod_runs_with_podman_kube_play(
    tool: Podman, workload_api: Path, tmp_path: Path
) -> None:
    app, client = containers.standin_images(tool)
    images = {
        "spiffe-envoy-sds": containers.sds_image(tool),
        "envoyproxy/envoy": containers.envoy_image(tool),
        "hashicorp/http-echo": app,
    }
    name = f"sds-demo-{uuid.uuid4().hex[:6]}"
    manifest = tmp_path / "sidecar.yaml"
    manifest.write_text(yaml.safe_dump_all(podman_objects(images, workload_api, name)))
    before = {kind: tool.names(kind, None) for kind in ("pod", "container", "volume")}
    assert not {"sds-bridge", "sds-envoy"} & set(before["volume"])
    try:
        tool.run("kube", "play", str(manifest), timeout=600)
        pod = f"{name}-pod-0"
        container = f"{pod}-sds-bridge"
        # startupProbe, then readiness and liveness: the manifest's own commands.
        manifest_pod = yaml.safe_load_all(manifest.read_text())
        deployment = next(o for o in manifest_pod if o["kind"] == "Deployment")
        spec = deployment["spec"]["template"]["spec"]
        original = next(c for c in render_pod()["initContainers"] if c["name"] == "sds-bridge")
        bridge = next(c for c in spec["containers"] if c["name"] == "sds-bridge")
        startup = original["startupProbe"]["exec"]["command"]
        deadline = time.monotonic() + 120
        while tool.run("exec", container, *startup, check=False).returncode != 0:
            assert time.monotonic() < deadline, tool.run("logs", container, check=False).stderr[
                -3000:
            ]
            time.sleep(2)
        for kind in ("readinessProbe", "livenessProbe"):
            probe = tool.run("exec", container, *bridge[kind]["exec"]["command"], check=False)
            assert probe.returncode == 0, (kind, probe.stdout, probe.stderr)

        def in_pod(*argv: str) -> Any:
            return tool.run(
                "run",
                "--rm",
                "--pod",
                pod,
                "--read-only",
                "--cap-drop",
                "ALL",
                client,
                *argv,
                check=False,
                timeout=120,
            )

        envoy = next(c for c in spec["containers"] if c["name"] == "envoy")
        ready = envoy["readinessProbe"]["httpGet"]
        port = next(p["containerPort"] for p in envoy["ports"] if p["name"] == ready["port"])
        url = f"http://127.0.0.1:{port}{ready['path']}"
        deadline = time.monotonic() + 120
        while (probe := in_pod("curl", "--silent", "--fail", url)).returncode != 0:
            assert time.monotonic() < deadline, tool.run(
                "logs", f"{pod}-envoy", check=False
            ).stderr[-3000:]
            time.sleep(2)
        assert probe.stdout.strip() == "LIVE"
        # The rest of Envoy's admin is not reachable that way.
        assert (
            in_pod(
                "curl",
                "--silent",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                f"http://127.0.0.1:{port}/quitquitquit",
            ).stdout
            == "404"
        )

        # The app answers through mTLS: the egress listener, Envoy's ingress, the app.
        call = in_pod("curl", "--silent", "--show-error", "--include", "http://127.0.0.1:9001/")
        assert call.returncode == 0, call.stderr
        assert call.stdout.startswith("HTTP/1.1 200 OK"), call.stdout
        assert call.stdout.rstrip().endswith("hello from the app (plain HTTP, no TLS)")
        lowered = call.stdout.lower()
        assert f"x-peer-uri-san: {POD_ID}" in lowered
        assert f"x-upstream-peer-uri-san: {POD_ID}" in lowered
        # No certificate, no entry: the handshake refuses a caller without an SVID.
        intruder = in_pod(
            "curl", "--silent", "--insecure", "--max-time", "10", "https://127.0.0.1:8443/"
        )
        assert intruder.returncode in (35, 55, 56), intruder.stderr  # refused in the handshake
    finally:
        down = tool.run("kube", "down", str(manifest), check=False, timeout=300)
        if down.returncode != 0 and "device or resource busy" in down.stderr:
            # podman 4.3 (Debian 12) can fail to unlink a container's shm while it is still
            # mounted and leave the pod half removed (containers/podman#11594, fixed after
            # 4.3); removing the pod again finishes it, and what remains is checked below.
            down = wait_for(
                lambda: _removed(tool, f"{name}-pod-0"), 60, "the half-removed pod to go"
            )
        # podman 4.3's `kube down` keeps the volumes it made from ConfigMaps.
        maps = [o["metadata"]["name"] for o in yaml.safe_load_all(manifest.read_text())]
        made = [name for name in tool.names("volume", None) if name in maps]
        if made:
            tool.run("volume", "rm", *made, check=False)
        after = {kind: tool.names(kind, None) for kind in ("pod", "container", "volume")}
    assert down.returncode == 0, down.stderr
    assert after == before


def _removed(tool: Podman, pod: str) -> Any:
    """``podman pod rm -f POD`` once it succeeds (None while it fails)."""
    result = tool.run("pod", "rm", "--force", "--time", "0", pod, check=False, timeout=120)
    return result if result.returncode == 0 else None


def render_pod() -> dict[str, Any]:
    (deployment,) = [o for o in render("sidecar") if o["kind"] == "Deployment"]
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec
