"""The bridge fed by a real SPIRE 1.13.3 agent, each test against a real Envoy.

One spire-server and one spire-agent run per session (the ``spire`` fixture, shared with
``tests/integration/test_spire.py``; see :mod:`tests.harness.spire`);
the agent issues ``spiffe://example.org/web`` to this test process's uid (so
to the bridge it starts), with a 30 s TTL so it rotates every 10-15 s. TLS
clients get their certificates minted by the server (``x509 mint``), so the
only identity the agent hands out is the bridge's.
"""

from __future__ import annotations

import signal
import ssl
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.harness.clientloop import ClientLoop
from tests.harness.envoy import (
    EnvoyProcess,
    Envoys,
    bootstrap,
    downstream_mtls_listener,
    sds_cluster,
)
from tests.harness.spire import (
    CLIENT_A,
    WEB,
    Spire,
)
from tests.harness.stack import Material, Stack
from tests.harness.tlsclient import HttpsClient, openssl_handshake

pytestmark = pytest.mark.spire


@pytest.fixture(autouse=True)
def _spire_logs_on_failure(spire_logs_on_failure: None) -> None:
    """A failed test here prints the tails of the SPIRE server's and agent's logs."""


@pytest.fixture
def stack(spire_stack: Stack) -> Stack:
    """A bridge (``sds run``) whose only upstream is the session's SPIRE agent."""
    return spire_stack


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
