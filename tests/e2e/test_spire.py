"""The bridge fed by a real SPIRE 1.13.3 agent, each test against a real Envoy.

One spire-server and one spire-agent run per module (see :mod:`tests.harness.spire`);
the agent issues ``spiffe://example.org/web`` to this test process's uid (so
to the bridge it starts), with a 30 s TTL so it rotates every 10-15 s. TLS
clients get their certificates minted by the server (``x509 mint``), so the
only identity the agent hands out is the bridge's.
"""

from __future__ import annotations

import signal
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Processes, wait_for
from tests.harness.clientloop import ClientLoop
from tests.harness.envoy import (
    EnvoyProcess,
    Envoys,
    bootstrap,
    downstream_mtls_listener,
    sds_cluster,
)
from tests.harness.spire import (
    TRUST_DOMAIN,
    SpireAgent,
    SpireServer,
    own_uid_selector,
    spire_binaries,
)
from tests.harness.stack import Material, Stack
from tests.harness.tlsclient import HttpsClient, openssl_handshake

pytestmark = pytest.mark.spire

WEB = f"spiffe://{TRUST_DOMAIN}/web"

CLIENT_A = f"spiffe://{TRUST_DOMAIN}/client-a"

CLIENT_B = f"spiffe://{TRUST_DOMAIN}/client-b"


class Spire:
    """The module's SPIRE: server, one agent, and minted client material."""

    def __init__(self, procs: Processes) -> None:
        server_bin, agent_bin = spire_binaries()
        self.procs = procs
        self.server = SpireServer(procs, server_bin).start()
        self.agent = SpireAgent(self.server, agent_bin).start()
        self.server.entry_create(self.agent.spiffe_id, WEB, own_uid_selector(), hint="web")
        self.agent.wait_svid(WEB)
        self.client_a = self.server.mint(CLIENT_A)
        self.client_b = self.server.mint(CLIENT_B)

    def close(self) -> None:
        self.agent.close()
        self.server.close()


@pytest.fixture(scope="module")
def spire(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spire]:
    procs = Processes(tmp_path_factory.mktemp("spire-logs"))
    env = Spire(procs)
    yield env
    env.close()
    procs.close()


@pytest.fixture(autouse=True)
def _spire_logs_on_failure(spire: Spire, request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for proc in (spire.server.proc, spire.agent.proc):
            if proc is not None:
                sys.stderr.write(f"\n----- spire -----\n{spire.procs.log(proc)[-4000:]}")


@pytest.fixture
def stack(procs: Processes, spire: Spire, sockdir: Path) -> Iterator[Stack]:
    """A bridge (``sds run``) whose only upstream is the module's SPIRE agent."""
    stack = Stack(procs, sockdir)
    stack.workload_socket = spire.agent.socket
    yield stack
    if stack.bridge is not None:
        procs.stop(stack.bridge)


def _envoy(envoys: Envoys, socket: Path, listener: dict[str, object]) -> EnvoyProcess:
    config = bootstrap("spire-envoy", "spire", [listener], [sds_cluster("sds", socket)])
    return envoys.start(config, ready_timeout=60)


def _https(material: Material) -> HttpsClient:
    return HttpsClient(material.ca, material.cert, material.key)


def _agent_serial(spire: Spire) -> int:
    svid = spire.agent.context().find(spiffe_id=WEB)
    assert svid is not None
    return svid.serial


def test_bridge_fed_by_spire_serves_mtls(spire: Spire, stack: Stack, envoys: Envoys) -> None:
    stack.start_bridge()
    envoy = _envoy(envoys, stack.sds_socket, downstream_mtls_listener("in"))
    port = envoy.listener_port("in")
    client = spire.client_a

    def handshake_matches_bridge() -> bool:
        shake = openssl_handshake("127.0.0.1", port, client.cert, client.key, client.ca)
        assert shake.ok and shake.verified, shake.output[-2000:]
        assert shake.spiffe_id == WEB
        return shake.serial == stack.served_serial()  # may race one rotation: retry

    wait_for(handshake_matches_bridge, 30, "Envoy to present the bridge's SVID")
    response = _https(client).get("127.0.0.1", port)
    assert response.status == 200
    assert response.headers["x-peer-uri-san"] == CLIENT_A
    # The bridge serves exactly what the agent issues (SPIRE signs it: our CA is not involved).
    wait_for(lambda: stack.served_serial() == _agent_serial(spire), 30, "bridge == agent serial")
    refused = openssl_handshake("127.0.0.1", port, None, None, client.ca)
    assert not refused.ok


def test_policy_refuses_the_wrong_spiffe_id(spire: Spire, stack: Stack, envoys: Envoys) -> None:
    stack.write_config(policies=[{"name": "callers", "allow": [CLIENT_A]}])
    stack.start_bridge()
    envoy = _envoy(
        envoys, stack.sds_socket, downstream_mtls_listener("in", validation_sds_name="callers")
    )
    port = envoy.listener_port("in")
    assert _https(spire.client_a).get("127.0.0.1", port).status == 200
    with pytest.raises((ssl.SSLError, OSError)):
        _https(spire.client_b).get("127.0.0.1", port)
    b = spire.client_b
    assert not openssl_handshake("127.0.0.1", port, b.cert, b.key, b.ca).ok


def test_spire_rotations_without_failed_requests(
    spire: Spire, stack: Stack, envoys: Envoys
) -> None:
    """SPIRE renews the 40 s SVID every 10-15 s: two rotations, Envoy presents each."""
    stack.start_bridge()
    envoy = _envoy(envoys, stack.sds_socket, downstream_mtls_listener("in"))
    loop = ClientLoop(_https(spire.client_a), envoy.listener_port("in")).start()
    try:
        first = stack.served_serial()
        second = wait_for(lambda: (s := stack.served_serial()) != first and s, 40, "rotation 1")
        third = wait_for(lambda: (s := stack.served_serial()) != second and s, 40, "rotation 2")
        wait_for(lambda: loop.serials and loop.serials[-1] == third, 10, "Envoy presents it")
    finally:
        loop.stop()
    assert loop.failures == []
    assert loop.serials[-2:] == [second, third]
    assert loop.ok > 50


@pytest.mark.chaos
def test_agent_restart_under_traffic(spire: Spire, stack: Stack, envoys: Envoys) -> None:
    stack.start_bridge()
    envoy = _envoy(envoys, stack.sds_socket, downstream_mtls_listener("in"))
    loop = ClientLoop(_https(spire.client_a), envoy.listener_port("in")).start()
    try:
        wait_for(lambda: loop.ok > 5, 20, "traffic")
        spire.agent.stop(signal.SIGKILL)
        before = loop.ok
        wait_for(lambda: loop.ok > before + 20, 20, "traffic while the agent is down")
        held = stack.served_serial()
        spire.agent.start()  # re-attests with its stored SVID, no new join token
        spire.agent.wait_svid(WEB)
        wait_for(
            lambda: stack.served_serial() == _agent_serial(spire) != held,
            60,
            "bridge to serve the restarted agent's SVID",
        )
        wait_for(
            lambda: loop.serials[-1] == stack.served_serial(), 20, "Envoy presents the new SVID"
        )
    finally:
        loop.stop()
    assert loop.failures == []
