"""``sds envoy-bootstrap``: flag checks, the generated config, Envoy validation, real traffic.

The tests here put a real Envoy in the path; the others are in
``tests/unit/test_bootstrap.py``.
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sds.tools import bootstrap as _bootstrap
from tests.conftest import Processes, wait_for
from tests.harness.bootstrap_flags import (
    BASE,
    CLIENT_A,
    CLIENT_B,
    INBOUND,
    OUTBOUND,
    TD,
    WEB,
    example_files,
    generate,
    is_snippet,
    parse,
)
from tests.harness.envoy import EchoApp, EnvoyError, EnvoyProcess, Envoys, validate_bootstrap
from tests.harness.stack import Stack

VARIANTS = [
    pytest.param((protocol, shape, api), id=f"{protocol}-{shape}-{api}")
    for protocol in ("http", "tcp")
    for shape in ("inbound", "outbound", "both", "any-td")
    for api in ("sotw", "delta")
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_passes_envoy_validate(
    variant: tuple[str, str, str], envoy_version: str
) -> None:
    protocol, shape, api = variant
    argv = [*BASE, "--protocol", protocol, "--api-type", api]
    if shape in ("inbound", "both"):
        argv += INBOUND
    if shape in ("outbound", "both"):
        argv += [*OUTBOUND, "--outbound", "127.0.0.1:9002=10.0.0.7:443", "--expect", f"{TD}/*"]
    if shape == "any-td":
        argv += ["--inbound", "8443:app.local:8080", "--allow-any-in-trust-domain"]
    _, config = generate(*argv)
    ok, output = validate_bootstrap(config, envoy_version)
    assert ok, output


def test_jwt_variant_passes_envoy_validate_and_wires_both_sides(envoy_version: str) -> None:
    jwks = "http://127.0.0.1:8181/jwks/example.org"
    argv = [*BASE, *INBOUND, *OUTBOUND, "--jwt-audience", "api", "--jwks-uri", jwks]
    options, config = generate(*argv)
    ok, output = validate_bootstrap(config, envoy_version)
    assert ok, output
    text = yaml.safe_dump(config)
    assert "jwt-svid:api" in text  # the outbound credential injector's SDS secret
    assert jwks in text and "x-jwt-payload" in text  # the inbound jwt_authn provider
    again, _ = generate(*shlex.split(_bootstrap.command_line(options))[2:])
    assert again == options


def test_every_example_passes_envoy_validate(envoy_version: str) -> None:
    bootstraps = [p for p in example_files() if not is_snippet(p)]
    assert bootstraps
    for path in bootstraps:
        ok, output = validate_bootstrap(yaml.safe_load(path.read_text()), envoy_version)
        assert ok, f"{path.name}: {output}"


def _get(port: int, path: str = "/hello") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclass
class Scene:
    """Provider, bridges, app and Envoys of one traffic test."""

    stack: Stack
    procs: Processes
    envoys: Envoys
    app: EchoApp
    sockdir: Path
    version: str

    def policies(self, name: str, *flags: str) -> list[dict[str, Any]]:
        """Run the generator with --bridge-config and read the snippet back, as a user would."""
        path = self.sockdir / f"{name}-policy.yaml"
        argv = [*BASE, "--inbound", "1:127.0.0.1:1", *flags, "--bridge-config", str(path)]
        args = parse(*argv)
        assert _bootstrap.run(args) == 0
        policies: list[dict[str, Any]] = yaml.safe_load(path.read_text())["policies"]
        return policies

    def client_bridge(self, hint: str) -> Path:
        """A second ``sds run`` on the same provider whose ``default`` is the SVID ``hint``."""
        socket = self.sockdir / hint / "sds.sock"
        config = self.sockdir / f"{hint}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "workload_api": f"unix://{self.stack.workload_socket}",
                    "listen": f"unix://{socket}",
                    "admin": "127.0.0.1:0",
                    "default_svid": {"hint": hint},
                }
            )
        )
        self.procs.sds("run", "--config", str(config), name=f"bridge-{hint}")
        wait_for(socket.exists, 15, f"{hint} bridge socket")
        return socket

    def server(self, *flags: str, ready: bool = True) -> tuple[EnvoyProcess, int]:
        """An Envoy from a generated inbound bootstrap in front of the app, on the main bridge."""
        _, config = generate(
            "--node-id",
            "server",
            "--sds-socket",
            str(self.stack.sds_socket),
            "--inbound",
            f"0:127.0.0.1:{self.app.port}",
            "--inbound-address",
            "127.0.0.1",
            "--admin-port",
            "0",
            *flags,
        )
        envoy = self.envoys.start(config, version=self.version, name="server", ready=ready)
        return envoy, envoy.listener_port("inbound")

    def client(
        self, socket: Path, routes: list[tuple[int, str]], *flags: str
    ) -> tuple[EnvoyProcess, list[int]]:
        """An Envoy from a generated outbound bootstrap: one listener per (port, expected ID)."""
        argv = ["--node-id", "client", "--sds-socket", str(socket), "--admin-port", "0", *flags]
        for port, expected in routes:
            argv += ["--outbound", f"127.0.0.1:0=127.0.0.1:{port}", "--expect", expected]
        _, config = generate(*argv)
        envoy = self.envoys.start(config, version=self.version, name="client")
        return envoy, [envoy.listener_port(f"outbound_{i}") for i in range(len(routes))]


@pytest.fixture
def scene(
    procs: Processes,
    envoys: Envoys,
    echo_app: EchoApp,
    sockdir: Path,
    envoy_version: str,
) -> Scene:
    return Scene(Stack(procs, sockdir), procs, envoys, echo_app, sockdir, envoy_version)


def test_generated_sidecars_carry_mtls_traffic_and_refuse_strangers(scene: Scene) -> None:
    scene.stack.write_config(
        policies=[
            *scene.policies("a", "--allow", CLIENT_A, "--policy-name", "allow-a"),
            *scene.policies("b", "--allow", CLIENT_B, "--policy-name", "allow-b"),
            # Wider than the RBAC of the Envoy that uses it: RBAC still refuses client-a.
            {"name": "wide", "allow": [CLIENT_A, CLIENT_B]},
        ]
    )
    scene.stack.start_provider()
    scene.stack.start_bridge()
    client_socket = scene.client_bridge("client-a")

    server_a, port_a = scene.server("--allow", CLIENT_A, "--policy-name", "allow-a")
    _, port_b = scene.server("--allow", CLIENT_B, "--policy-name", "allow-b")
    _, port_c = scene.server("--allow", CLIENT_B, "--policy-name", "wide")
    routes = [
        (port_a, WEB),  # 0: allowed caller, expected server
        (port_b, WEB),  # 1: server B's policy does not allow client-a
        (port_a, f"{TD}/not-web"),  # 2: server A is not who we expect
        (port_c, WEB),  # 3: the handshake admits client-a, RBAC does not
        (port_a, f"{TD}/*"),  # 4: prefix expectation
    ]
    client, ports = scene.client(client_socket, routes, "--api-type", "delta")

    status, body = _get(ports[0])
    assert status == 200, body
    seen = json.loads(body)
    assert seen["path"] == "/hello"
    xfcc = seen["headers"]["x-forwarded-client-cert"].split(";")
    assert f"URI={CLIENT_A}" in xfcc
    assert f"By={WEB}" in xfcc

    status, body = _get(ports[1])
    assert status == 503, body
    status, body = _get(ports[2])
    assert status == 503, body
    # The SAN matchers of the combined validation context applied with the SPIFFE validator.
    assert client.stat("cluster.outbound_2.ssl.fail_verify_san") == 1
    assert client.stat("cluster.outbound_0.ssl.fail_verify_san") == 0
    status, body = _get(ports[3])
    assert status == 403, body
    assert body == b"RBAC: access denied"
    assert _get(ports[4])[0] == 200

    # Only the two admitted requests reached the app.
    assert [r["path"] for r in scene.app.requests] == ["/hello", "/hello"]
    assert server_a.stat("listener.inbound.ssl.handshake") == 2


def test_generated_tcp_sidecars_proxy_mtls_and_refuse_strangers(scene: Scene) -> None:
    scene.stack.write_config(
        policies=scene.policies("b", "--allow", CLIENT_B, "--policy-name", "allow-b")
    )
    scene.stack.start_provider()
    scene.stack.start_bridge()
    client_socket = scene.client_bridge("client-a")
    tcp = ("--protocol", "tcp")

    # The bridge does not serve policy allow-a yet: initial_fetch_timeout 0s keeps Envoy unready.
    server_a, port_a = scene.server(
        *tcp, "--allow", CLIENT_A, "--policy-name", "allow-a", ready=False
    )
    with pytest.raises(EnvoyError, match=r"not ready after 1\.0s"):
        server_a.wait_ready(1.0)
    assert "allow-a" in server_a.warming_secrets()
    # Adding the generated snippet to the bridge config and SIGHUP is enough.
    scene.stack.write_config(
        policies=scene.policies("a", "--allow", CLIENT_A, "--policy-name", "allow-a")
        + scene.policies("b", "--allow", CLIENT_B, "--policy-name", "allow-b")
    )
    os.kill(scene.stack.bridge.pid, signal.SIGHUP)
    server_a.wait_ready(15)

    _, port_b = scene.server(*tcp, "--allow", CLIENT_B, "--policy-name", "allow-b")
    routes = [(port_a, WEB), (port_b, WEB), (port_a, CLIENT_B)]
    client, ports = scene.client(client_socket, routes, *tcp)

    status, body = _get(ports[0])
    assert status == 200
    assert "x-forwarded-client-cert" not in json.loads(body)["headers"]  # TCP: no identity header
    for port in ports[1:]:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            _get(port)
    assert client.stat("cluster.outbound_2.ssl.fail_verify_san") == 1
    assert len(scene.app.requests) == 1


def _curl_as(uid: int | None, *argv: str) -> subprocess.CompletedProcess[str]:
    """curl (from /usr/bin, reachable by any uid) as ``uid`` (None: as us)."""
    prefix = (
        [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    )
    command = [*prefix, "curl", "--silent", "--max-time", "5", "--output", "/dev/null"]
    command += ["--write-out", "%{http_code}", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.hostile
def test_other_uid_cannot_reach_or_stop_envoy_through_its_admin(
    envoys: Envoys, sockdir: Path, envoy_version: str
) -> None:
    """Hole 5 of issue 7: a generated bootstrap's admin is a 0600 socket, not loopback TCP.

    The socket sits in a world-searchable directory (``sockdir`` is 0755), so
    only its own mode stands between uid 1000 and ``POST /quitquitquit``.
    """
    admin = sockdir / "admin.sock"
    argv = [*OUTBOUND, "--sds-socket", str(sockdir / "sds.sock"), "--node-id", "n"]
    _, config = generate(*argv, "--admin-socket", str(admin))
    envoy = envoys.start(config, version=envoy_version, ready=False)
    wait_for(admin.exists, 20, "Envoy's admin socket")
    assert oct(admin.stat().st_mode & 0o777) == "0o600"
    url = "http://localhost"
    # Envoy's own uid (root here) reaches it: Envoy is initializing (no SDS yet), /ready 503.
    assert wait_for(lambda: _curl_as(None, "--unix-socket", str(admin), f"{url}/ready").stdout)
    assert _curl_as(None, "--unix-socket", str(admin), f"{url}/ready").stdout == "503"
    attack = _curl_as(1000, "--unix-socket", str(admin), "-X", "POST", f"{url}/quitquitquit")
    assert attack.stdout == "000"  # no HTTP exchange at all
    assert attack.returncode == 7  # curl: couldn't connect (EACCES on the 0600 socket)
    assert envoy.alive()
    assert _curl_as(None, "--unix-socket", str(admin), f"{url}/ready").stdout == "503"

    # The old default, now only on request: loopback TCP is open to uid 1000.
    _, config = generate(*argv, "--admin-port", "0")
    tcp = envoys.start(config, version=envoy_version, ready=False, name="tcp-admin")
    port = tcp.admin_port(20)
    assert _curl_as(1000, f"http://127.0.0.1:{port}/ready").stdout == "503"
