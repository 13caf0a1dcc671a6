"""The Go SPIFFE ecosystem as a peer: go-spiffe clients and servers, and Ghostunnel.

The tests here run in process, with no child process and no Envoy; the others are in
``tests/integration/test_gopeers.py``.
"""

from __future__ import annotations

import importlib.metadata

from tests.conftest import REPO
from tests.harness import gobuild
from tests.harness.envoy import CURRENT_VERSION, DEFAULT_VERSIONS


def readme_peer_rows() -> dict[str, tuple[str, str]]:
    """Peer -> (version, covers) from the README's "Tested peers" table."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Tested peers", 1)[1].split("\n#", 1)[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("peer", "---"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_readme_tested_peers_table_matches_what_the_suite_runs() -> None:
    """Versions come from what the suite pins; the built binaries are checked in their tests."""
    rows = readme_peer_rows()
    go_mod = (gobuild.GOPEERS_SOURCES / "go.mod").read_text()
    assert f"github.com/spiffe/go-spiffe/v2 {gobuild.GO_SPIFFE_VERSION}" in go_mod
    envoy_versions = ", ".join(
        sorted({CURRENT_VERSION, *DEFAULT_VERSIONS.split(",")}, reverse=True)
    )
    expected_versions = {
        "Envoy": envoy_versions,
        "py-spiffe": importlib.metadata.version("spiffe"),
        "go-spiffe": gobuild.GO_SPIFFE_VERSION,
        "Ghostunnel": gobuild.GHOSTUNNEL_VERSION,
        "OpenSSL": "system",
        "curl": "system",
    }
    assert {peer: version for peer, (version, _) in rows.items()} == expected_versions
    for peer, (_, covers) in rows.items():
        assert covers, peer
