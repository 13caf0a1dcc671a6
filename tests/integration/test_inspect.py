"""``sds inspect`` against the strict fake Workload API (in-process) and the real provider.

The tests here start real processes (the bridge, the provider, peers), no Envoy; the others are in
``tests/unit/test_inspect.py``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, Processes, run_sds, wait_for


@pytest.fixture(autouse=True)
def _restore_sds_logging(restore_sds_logging: None) -> None:
    """cli.main() configures the ``sds`` logger for the process; undo it after each test."""


def test_inspect_missing_socket_as_a_process(sockdir: Path) -> None:
    """The real command line: exit status 1 and exactly one line on stderr."""
    address = f"unix://{sockdir}/missing.sock"
    proc = run_sds("inspect", "--path", address, cwd=REPO)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert (
        proc.stderr == f"sds inspect: workload API at {address} is unavailable: socket not found\n"
    )


def test_inspect_against_the_real_provider(procs: Processes, sockdir: Path, tmp_path: Path) -> None:
    identities = tmp_path / "identities.yaml"
    identities.write_text(
        "kind: workload_identity\nversion: v1\nmetadata: {name: web}\n"
        "spec: {spiffe: {id: /web, hint: web,\n"
        "  x509: {dns_sans: [web.local], ip_sans: [10.1.2.3]}}}\n"
    )
    path = sockdir / "api.sock"
    procs.sds(
        "workload-api",
        "--socket",
        str(path),
        "--trust-domain",
        "example.org",
        "--identities",
        str(identities),
        "--ephemeral",
        name="provider",
    )
    wait_for(path.exists, timeout=30, what="the provider's socket")
    argv = [PYTHON, "-m", "sds", "inspect", "--path", f"unix://{path}", "--audience", "payments"]
    argv.append("--show-token")
    human = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert (human.returncode, human.stderr) == (0, "")
    assert "  spiffe://example.org/web\n    hint:      web\n" in human.stdout
    assert "    DNS SANs:  web.local\n    IP SANs:   10.1.2.3\n" in human.stdout
    assert "X.509 trust bundles: 1\n  example.org: 1 CA certificate\n" in human.stdout
    report = json.loads(
        subprocess.run(
            [*argv, "--json"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    )
    [svid] = report["x509_svids"]
    assert (svid["spiffe_id"], svid["hint"], svid["ip_sans"]) == (
        "spiffe://example.org/web",
        "web",
        ["10.1.2.3"],
    )
    [jwt] = report["jwt_svids"]
    assert jwt["spiffe_id"] == "spiffe://example.org/web" and jwt["token"].count(".") == 2
    [jwt_bundle] = report["jwt_bundles"]
    assert jwt_bundle["trust_domain"] == "example.org" and len(jwt_bundle["key_ids"]) == 1
