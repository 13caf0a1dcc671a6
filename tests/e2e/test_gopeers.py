"""The Go SPIFFE ecosystem as a peer: go-spiffe clients and servers, and Ghostunnel.

The tests here put a real Envoy in the path; the others are in
``tests/integration/test_gopeers.py``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sds.tools import bootstrap as _bootstrap
from tests.conftest import Processes, wait_for
from tests.harness.envoy import CURRENT_VERSION, EchoApp, EnvoyProcess, Envoys, http_request
from tests.harness.gopeers import BACKEND, CLIENT_A, CLIENT_B, WEB, go_client, json_lines
from tests.harness.stack import Stack


@pytest.fixture
def stack(gopeers_stack: Stack) -> Stack:
    """Provider (web, client-a, client-b, backend) and the bridge (``default`` = web)."""
    return gopeers_stack


def generate(*argv: str) -> dict[str, Any]:
    """A bootstrap from ``sds envoy-bootstrap`` flags, as Envoy reads it."""
    parser = argparse.ArgumentParser()
    _bootstrap.add_arguments(parser)
    options = _bootstrap.options_from_args(parser.parse_args(list(argv)))
    config: dict[str, Any] = yaml.safe_load(_bootstrap.render_bootstrap(options))
    return config


def inbound_envoy(
    stack: Stack, envoys: Envoys, app: EchoApp, allow: str
) -> tuple[EnvoyProcess, int]:
    """Provider, bridge with the generated policy snippet, and an inbound Envoy before ``app``."""
    snippet = stack.dir / "policy.yaml"
    flags = ["--node-id", "server", "--sds-socket", str(stack.sds_socket), "--admin-port", "0"]
    flags += ["--inbound", f"0:127.0.0.1:{app.port}", "--inbound-address", "127.0.0.1"]
    flags += ["--allow", allow]
    config = generate(*flags)
    # The policy the bridge needs, written by the generator as a user would get it.
    parser = argparse.ArgumentParser()
    _bootstrap.add_arguments(parser)
    written = stack.dir / "envoy.yaml"
    args = parser.parse_args([*flags, "--bridge-config", str(snippet), "-o", str(written)])
    assert _bootstrap.run(args) == 0
    stack.write_config(policies=yaml.safe_load(snippet.read_text())["policies"])
    stack.start_provider()
    stack.start_bridge()
    envoy = envoys.start(config, version=CURRENT_VERSION, name="server")
    return envoy, envoy.listener_port("inbound")


def test_spiffetls_client_through_the_envoy_inbound_listener(
    procs: Processes, gopeers: Path, stack: Stack, envoys: Envoys, echo_app: EchoApp
) -> None:
    envoy, port = inbound_envoy(stack, envoys, echo_app, CLIENT_A)

    allowed = go_client(procs, gopeers, stack, port, hint="client-a", server_id=WEB)
    assert allowed["own_id"] == CLIENT_A
    assert allowed.get("status") == 200, allowed
    seen = json.loads(allowed["body"])
    assert seen["path"] == "/hello"
    xfcc = seen["headers"]["x-forwarded-client-cert"].split(";")
    assert f"URI={CLIENT_A}" in xfcc and f"By={WEB}" in xfcc

    # client-b is not in the policy: Envoy refuses its certificate.
    refused = go_client(procs, gopeers, stack, port, hint="client-b", server_id=WEB)
    assert refused["own_id"] == CLIENT_B
    assert "status" not in refused, refused
    # TLS 1.3: Envoy rejects the certificate after the client's Finished, so the client sees
    # the alert or, if its request write races the close, a broken pipe / reset.
    assert re.search(r"remote error: tls: |broken pipe|connection reset by peer", refused["error"])
    assert envoy.stat("listener.inbound.ssl.fail_verify_san") == 1

    # The client authorizes the server: web is not the backend it expects.
    wrong = go_client(procs, gopeers, stack, port, hint="client-a", server_id=BACKEND)
    assert "status" not in wrong, wrong
    assert f'unexpected ID "{WEB}"' in wrong["error"], wrong
    assert [r["path"] for r in echo_app.requests] == ["/hello"]


def start_go_server(procs: Processes, gopeers: Path, stack: Stack, allow: str) -> int:
    argv = [str(gopeers), "server", "-addr", f"unix://{stack.workload_socket}"]
    argv += ["-hint", "backend", "-allow", allow]
    proc = procs.start(argv, "gopeers-server")

    def listening() -> str | None:
        assert proc.poll() is None, procs.log(proc)
        for line in json_lines(procs.log(proc)):
            if "listening" in line:
                assert line["own_id"] == BACKEND
                return str(line["listening"])
        return None

    return int(wait_for(listening, 30, "gopeers server listening").rsplit(":", 1)[1])


def test_spiffetls_server_behind_the_envoy_outbound_listener(
    procs: Processes, gopeers: Path, stack: Stack, envoys: Envoys
) -> None:

    stack.start_provider()
    stack.start_bridge()
    admits_web = start_go_server(procs, gopeers, stack, WEB)
    admits_b = start_go_server(procs, gopeers, stack, CLIENT_B)
    routes = [(admits_web, BACKEND), (admits_web, CLIENT_B), (admits_b, BACKEND)]
    flags = ["--node-id", "client", "--sds-socket", str(stack.sds_socket), "--admin-port", "0"]
    for port, expected in routes:
        flags += ["--outbound", f"127.0.0.1:0=127.0.0.1:{port}", "--expect", expected]
    envoy = envoys.start(generate(*flags), version=CURRENT_VERSION, name="client")
    ports = [envoy.listener_port(f"outbound_{i}") for i in range(len(routes))]

    def get(port: int) -> tuple[int, bytes]:
        return http_request(port, "/hello", timeout=10)

    status, body = get(ports[0])
    assert status == 200, body
    # The Go server saw Envoy present the bridge's default SVID.
    assert json.loads(body) == {"path": "/hello", "server_id": BACKEND, "peer_id": WEB}
    assert get(ports[1])[0] == 503  # Envoy expected client-b; the server is backend
    assert envoy.stat("cluster.outbound_1.ssl.fail_verify_san") == 1
    assert get(ports[2])[0] == 503  # the Go server admits only client-b, not web
