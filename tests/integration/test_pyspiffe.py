"""Interoperability: py-spiffe, an independent Workload API client, against ``sds workload-api``.

py-spiffe runs in its own process (tests/harness/pyspiffe_probe.py): it registers the
same package-less protobuf names as ``sds._proto`` and must never be imported
here. The probe validates everything with py-spiffe's own code and prints JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tests.conftest import PYTHON, REPO, Processes
from tests.harness.provider import start_federated_provider
from tests.harness.stack import svc_identities

PROBE = REPO / "tests" / "harness" / "pyspiffe_probe.py"

IDENTITIES = svc_identities(
    ("web", f"eq: {{value: {os.getuid()}}}"),
    ("hidden", f"not_eq: {{value: {os.getuid()}}}"),
    ("batch", None),
)


def run_probe(procs: Processes, socket_uri: str, *args: str) -> dict[str, Any]:
    proc = procs.start([PYTHON, str(PROBE), socket_uri, *args], "pyspiffe")
    assert proc.wait(60) == 0, procs.log(proc)
    lines = [line for line in procs.log(proc).splitlines() if line.startswith("{")]
    assert lines, procs.log(proc)
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def test_pyspiffe_fetches_and_validates_everything(
    procs: Processes, sockdir: Path, tmp_path: Path
) -> None:
    sock = sockdir / "workload.sock"
    server = start_federated_provider(procs, sock, tmp_path, IDENTITIES)

    out = run_probe(procs, f"unix://{sock}", "payments", "spiffe://example.org/svc/hidden")

    assert out["x509_spiffe_ids"] == [
        "spiffe://example.org/svc/web",
        "spiffe://example.org/svc/batch",
    ]
    assert out["x509_hints"] == ["web", "batch"]
    assert out["x509_trust_domain"] == "example.org"
    assert out["x509_chain_valid"] is True
    assert out["x509_context_trust_domains"] == ["example.org", "partner.org"]
    assert out["bundle_trust_domains"] == ["example.org", "partner.org"]
    assert out["bundle_verifies_svid"] is True
    assert out["jwt_bundle_trust_domains"] == ["example.org"]
    assert out["jwt_subject"] == "spiffe://example.org/svc/web"
    assert out["jwt_audience"] == ["payments"]
    assert out["jwt_expiry_after_now"] is True
    assert out["server_validated_subject"] == "spiffe://example.org/svc/web"
    assert "PERMISSION_DENIED" in out["denied_error"]
    assert "is not entitled to spiffe://example.org/svc/hidden" in out["denied_error"]
    assert server.poll() is None
