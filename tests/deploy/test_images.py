"""The images, built and run here with podman: ours (Dockerfile) and Envoy from its wheel.

No registry is reachable, so the Dockerfile's real default base
(``PYTHON_IMAGE=python:3.11...-slim``) is replaced, through ``--build-arg``
only, by a local Debian base made with debootstrap (tests/harness/containers.py).
Both images must run as non-root with a read-only root filesystem, and
``sds run`` must serve from inside ours. Skipped, with the reason, where
podman cannot be installed or run.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import containers
from tests.harness.containers import Podman
from tests.harness.manifests import VERSION

REPO = Path(__file__).resolve().parents[2]
ENVOY_VERSION = containers.ENVOY_VERSION
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # a first run makes the base image


@pytest.fixture(scope="session")
def tool() -> Podman:
    return containers.podman()


@pytest.fixture(scope="session")
def sds_image(tool: Podman) -> str:
    return containers.sds_image(tool)


@pytest.fixture(scope="session")
def envoy_image(tool: Podman) -> str:
    return containers.envoy_image(tool)


@pytest.fixture
def label(tool: Podman) -> Iterator[str]:
    """A label for everything one test creates; at teardown all of it is gone."""
    value = f"sds-tests={uuid.uuid4().hex[:12]}"
    yield value
    for name in tool.names("container", value):
        tool.run("rm", "--force", "--time", "2", name, check=False)
    for name in tool.names("volume", value):
        tool.run("volume", "rm", "--force", name, check=False)
    assert tool.names("container", value) == []
    assert tool.names("volume", value) == []


RESTRICTED = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]


def test_sds_image_is_non_root_and_works_read_only(tool: Podman, sds_image: str) -> None:
    (info,) = tool.json("image", "inspect", sds_image)  # type: ignore[misc]
    assert info["Config"]["User"] == "10001:10001"
    assert info["Config"]["Entrypoint"] == ["sds"]
    assert info["Config"]["Labels"]["org.opencontainers.image.version"] == VERSION
    result = tool.run("run", "--rm", *RESTRICTED, sds_image, "--version")
    assert result.stdout == f"sds {VERSION}\n"
    result = tool.run("run", "--rm", *RESTRICTED, sds_image, "--help")
    assert result.stdout.startswith("usage: sds ")
    ids = tool.run("run", "--rm", *RESTRICTED, "--entrypoint", "id", sds_image).stdout
    assert ids.strip() == "uid=10001(sds) gid=10001(sds) groups=10001(sds)"
    # Read-only really (podman adds tmpfs only at /tmp, /var/tmp and /run).
    touch = tool.run(
        "run", "--rm", *RESTRICTED, "--entrypoint", "touch", sds_image, "/usr/local/x", check=False
    )
    assert touch.returncode != 0
    assert "Read-only file system" in touch.stderr
    # No compiler or build tool came along.
    which = tool.run(
        "run",
        "--rm",
        *RESTRICTED,
        "--entrypoint",
        "sh",
        sds_image,
        "-c",
        "command -v gcc cc make || echo none",
    )
    assert which.stdout.strip() == "none"


def test_sds_run_serves_from_inside_the_image(tool: Podman, sds_image: str, label: str) -> None:
    """The compose demo's provider and server-side bridge, each in a read-only container."""
    compose = REPO / "deploy" / "compose"
    spiffe, sds = f"spiffe-{label[-12:]}", f"sds-{label[-12:]}"
    for volume in (spiffe, sds):
        tool.run("volume", "create", "--label", label, volume)
    common = ["--detach", "--label", label, *RESTRICTED, "--network", "none"]
    tool.run(
        "run",
        *common,
        "--name",
        f"provider-{label[-12:]}",
        "--user",
        "10001:10001",
        "-v",
        f"{spiffe}:/run/spiffe",
        "-v",
        f"{compose / 'identities.yaml'}:/etc/sds/identities.yaml:ro",
        sds_image,
        "workload-api",
        "--socket=/run/spiffe/workload.sock",
        "--trust-domain=demo.example",
        "--identities=/etc/sds/identities.yaml",
        "--ephemeral",
    )
    bridge = f"bridge-{label[-12:]}"
    tool.run(
        "run",
        *common,
        "--name",
        bridge,
        "--user",
        "10001:10011",
        "-v",
        f"{spiffe}:/run/spiffe",
        "-v",
        f"{sds}:/run/sds",
        "-v",
        f"{compose / 'sds-server.yaml'}:/etc/sds/sds.yaml:ro",
        sds_image,
        "run",
        "--config",
        "/etc/sds/sds.yaml",
        "--metrics",
        "127.0.0.1:9102",
    )
    waited = tool.run(
        "exec", bridge, "sds", "wait", "--admin", "127.0.0.1:8181", "--timeout", "60", check=False
    )
    assert waited.returncode == 0, waited.stderr + tool.run("logs", bridge).stderr[-3000:]
    assert waited.stdout.strip() == "ready"
    # The SDS socket: 0660 in the bridge's group, in a directory it owns.
    stat = tool.run(
        "exec", bridge, "stat", "-c", "%a %u:%g", "/run/sds/sds.sock", "/run/sds"
    ).stdout
    assert stat.split("\n")[:2] == ["660 10001:10011", "755 10001:10001"]
    secrets = json.loads(
        tool.run(
            "exec",
            bridge,
            "python",
            "-c",
            "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8181/secrets').read().decode())",
        ).stdout
    )
    default = next(item for item in secrets if item["name"] == "default")
    assert default["spiffe_id"] == "spiffe://demo.example/server"
    metrics = tool.run(
        "exec",
        bridge,
        "python",
        "-c",
        "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9102/metrics').read().decode())",
    ).stdout
    assert "\nsds_ready 1.0\n" in metrics


def test_envoy_image_from_the_wheel_runs_as_envoy_read_only(tool: Podman, envoy_image: str) -> None:
    (info,) = tool.json("image", "inspect", envoy_image)  # type: ignore[misc]
    assert info["Config"]["User"] == "101:101"
    version = tool.run("run", "--rm", *RESTRICTED, envoy_image, "envoy", "--version").stdout
    assert f"/{ENVOY_VERSION}/" in version
    config = REPO / "deploy" / "compose" / "envoy-server.yaml"
    result = tool.run(
        "run",
        "--rm",
        *RESTRICTED,
        "-v",
        f"{config}:/etc/envoy/envoy.yaml:ro",
        envoy_image,
        "envoy",
        "--mode",
        "validate",
        "-c",
        "/etc/envoy/envoy.yaml",
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
