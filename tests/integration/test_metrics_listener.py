"""The scrape listener (``metrics: IP:PORT``, ``--metrics``): probes and metrics, nothing else.

It may bind a pod IP for Prometheus and the kubelet, so it must never serve
what the loopback-only admin endpoint does: ``/secrets``, ``/envoys``, JWKS.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sds.bridge.config import MetricsConfig, load_config
from tests.conftest import Processes, wait_for
from tests.harness.metrics_listener import metrics_port, scrape_get
from tests.harness.stack import TRUST_DOMAIN, Stack


@pytest.mark.hostile
def test_metrics_listener_serves_probes_and_metrics_never_secrets(
    procs: Processes, sockdir: Path
) -> None:
    stack = Stack(procs, sockdir)
    stack.write_config(metrics="127.0.0.1:0")
    assert load_config(stack.config_path).metrics == MetricsConfig("127.0.0.1", 0)
    stack.start_provider()
    stack.start_bridge()
    port = metrics_port(procs, stack)
    assert port != stack.admin_port

    assert wait_for(lambda: scrape_get(port, "/readyz") == (200, b"ready\n"), 15, "/readyz 200")
    assert scrape_get(port, "/healthz") == (200, b"ok\n")
    status, body = scrape_get(port, "/metrics")
    assert status == 200
    assert b"\nsds_ready 1.0\n" in body
    assert b"sds_svid_not_after_timestamp_seconds{" in body
    # What only the loopback admin endpoint may say: secrets, Envoys, JWT bundles.
    for path in ("/secrets", "/envoys", f"/jwks/{TRUST_DOMAIN}", "/jwks/", "/secrets/"):
        assert scrape_get(port, path) == (404, b"not found; try /healthz, /readyz, /metrics\n"), (
            path
        )
    assert scrape_get(port, "/metrics", method="POST")[0] == 405
    # The admin endpoint still has them.
    assert scrape_get(stack.admin_port, "/secrets")[0] == 200
    assert scrape_get(stack.admin_port, f"/jwks/{TRUST_DOMAIN}")[0] == 200


def test_metrics_listener_answers_before_upstream_with_the_reason(
    procs: Processes, sockdir: Path
) -> None:
    """Probes on the metrics listener tell the truth from the start: not ready, and why."""
    stack = Stack(procs, sockdir)
    stack.config_path.write_text(
        yaml.safe_dump(
            {
                "workload_api": f"unix://{stack.workload_socket}",
                "listen": f"unix://{stack.sds_socket}",
                "admin": "off",
            }
        )
    )
    stack.bridge = procs.sds(
        "run", "--config", str(stack.config_path), "--metrics", "127.0.0.1:0", name="bridge"
    )
    port = metrics_port(procs, stack)
    assert scrape_get(port, "/readyz") == (
        503,
        b"not ready: no X.509 context from the Workload API yet\n",
    )
    assert scrape_get(port, "/healthz") == (200, b"ok\n")
    assert b"\nsds_ready 0.0\n" in scrape_get(port, "/metrics")[1]
