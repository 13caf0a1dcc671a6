"""Chaos with a real Envoy (issue 9 item 12; short versions of ``bench/chaos.py``): upstream
restarts and ``kill -9`` of the bridge under continuous mTLS traffic, an outage longer than
the SVID lifetime, and a stalled upstream. Every request opens a new connection."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import Processes, wait_for
from tests.harness.chaos import (
    StallProxy,
    Traffic,
    kill_bridge,
    outage_recovery,
    restart_provider,
    start_envoy,
)
from tests.harness.envoy import Envoys
from tests.harness.stack import Stack
from tests.harness.tlsclient import HttpsClient

pytestmark = pytest.mark.chaos


def _traffic(stack: Stack, port: int) -> Traffic:
    client = stack.material("client-a")
    traffic = Traffic(HttpsClient(client.ca, client.cert, client.key), port).start()
    wait_for(lambda: traffic.ok >= 5, 20, "traffic through Envoy")
    return traffic


def test_upstream_restarts_and_bridge_kill9_lose_no_request(
    procs: Processes, sockdir: Path, envoys: Envoys
) -> None:
    stack = Stack(procs, sockdir, x509_ttl="30s")  # every outage is far shorter than TTL/2
    stack.start_provider()
    stack.start_bridge()
    _, port = start_envoy(envoys, stack)
    traffic = _traffic(stack, port)
    try:
        for _ in range(3):
            restart_provider(stack, procs)
            kill_bridge(stack, procs)
            before = traffic.ok
            wait_for(lambda before=before: traffic.ok > before + 3, 20, "traffic after restarts")
        wait_for(lambda: traffic.serial() == stack.served_serial(), 20, "Envoy presents it")
    finally:
        traffic.stop()
    assert traffic.failures == []
    assert traffic.ok > 50


def test_after_an_outage_longer_than_the_ttl_the_new_svid_reaches_envoy(
    procs: Processes, sockdir: Path, envoys: Envoys
) -> None:
    stack = Stack(procs, sockdir, x509_ttl="3s")
    stack.start_provider()
    stack.start_bridge()
    _, port = start_envoy(envoys, stack)
    traffic = _traffic(stack, port)
    try:
        figures = outage_recovery(stack, procs, traffic, outage=4.0)
    finally:
        traffic.stop()
    assert figures["outage"] > 3.0
    assert "workload_api.socket_appeared" in procs.log(stack.bridge)
    sys.stderr.write(f"outage recovery: {figures}\n")  # the figure; bench/recovery.py times it


def test_a_stalled_upstream_is_abandoned_for_a_working_one_at_the_same_path(
    procs: Processes, sockdir: Path, envoys: Envoys
) -> None:
    stack = Stack(procs, sockdir, x509_ttl="6s")
    proxy = StallProxy(sockdir / "proxy.sock", stack.workload_socket)
    stack.write_config(workload_api=f"unix://{proxy.listen}")
    stack.start_provider()
    proxy.start()
    try:
        stack.start_bridge()
        _, port = start_envoy(envoys, stack)
        traffic = _traffic(stack, port)
        try:
            assert proxy.freeze() >= 1  # the bridge's connection: open, silent from now on
            frozen_at = stack.served_serial()
            # The stream is abandoned before the 6 s SVID expires; the new connection
            # (to the same path) gets a fresh SVID, which Envoy presents.
            wait_for(lambda: "workload_api.silent" in procs.log(stack.bridge), 15, "stall seen")
            wait_for(lambda: stack.served_serial() != frozen_at, 15, "a fresh SVID")
            wait_for(lambda: traffic.serial() == stack.served_serial(), 15, "Envoy presents it")
        finally:
            traffic.stop()
    finally:
        proxy.close()
    assert "svid.expired" not in procs.log(stack.bridge)
    assert traffic.failures == []
