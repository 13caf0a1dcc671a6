"""The Workload API client and Watcher, against the strict in-process fake (and the real provider).

The tests here start real processes (the bridge, the provider, peers), no Envoy; the others are in
``tests/unit/test_workloadapi.py``.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sds.errors import WorkloadApiUnavailable
from sds.spiffe.id import SpiffeId, TrustDomain
from sds.spiffe.jwt import JwtBundle, validate_jwt_svid
from sds.workloadapi.client import WorkloadApiClient
from tests.conftest import Processes
from tests.harness.fake_workload_api import eventually
from tests.harness.watcher import serials, watching


@pytest.fixture(autouse=True)
def _capture_sds_logs(sds_debug_logs: None) -> None:
    """Make sds.* records reach caplog even if a CLI test configured logging in this process."""


IDENTITIES = textwrap.dedent(
    """\
    kind: workload_identity
    version: v1
    metadata: {name: web}
    spec: {spiffe: {id: /web, hint: web, x509: {dns_sans: [web.local]}}}
    """
)


def start_provider(procs: Processes, socket_path: Path, state_dir: Path, identities: Path) -> Any:
    return procs.sds(
        "workload-api",
        "--socket",
        str(socket_path),
        "--trust-domain",
        "example.org",
        "--identities",
        str(identities),
        "--state-dir",
        str(state_dir),
        "--x509-ttl",
        "30s",
        name="provider",
    )


async def test_watcher_survives_a_provider_restart(
    procs: Processes, sockdir: Path, tmp_path: Path
) -> None:
    """Kill ``sds workload-api`` hard, start it again on the same state: the watcher follows."""
    identities = tmp_path / "identities.yaml"
    identities.write_text(IDENTITIES)
    state, path = tmp_path / "state", sockdir / "api.sock"
    provider = start_provider(procs, path, state, identities)
    await eventually(path.exists, timeout=30, what="the provider's socket")
    async with watching(f"unix://{path}", backoff_max=0.5) as (watcher, rec):
        first = await watcher.wait_ready(20)
        [svid] = first.svids
        assert (str(svid.spiffe_id), svid.hint, svid.dns_sans()) == (
            "spiffe://example.org/web",
            "web",
            ["web.local"],
        )
        await asyncio.to_thread(procs.stop, provider, signal.SIGKILL)
        await eventually(lambda: rec.of("disconnected"), what="the watcher to notice")
        assert serials(watcher.current()) == {"spiffe://example.org/web": svid.serial}

        start_provider(procs, path, state, identities)
        await eventually(
            lambda: serials(watcher.current())["spiffe://example.org/web"] != svid.serial,
            timeout=30,
            what="an SVID from the restarted provider",
        )
        second = watcher.current()
        assert second is not None
        assert second.bundles == first.bundles  # same --state-dir: same CA
        assert len(rec.of("connected")) == 2
        assert isinstance(rec.of("disconnected")[0], WorkloadApiUnavailable)


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


async def test_client_against_the_real_provider(
    procs: Processes, sockdir: Path, tmp_path: Path
) -> None:
    identities = tmp_path / "identities.yaml"
    identities.write_text(IDENTITIES)
    path = sockdir / "api.sock"
    start_provider(procs, path, tmp_path / "state", identities)
    # Listening, not only bound: the provider binds, then chmods, then listens.
    await eventually(lambda: _accepts(path), timeout=30, what="the provider's socket")
    async with WorkloadApiClient(f"unix://{path}") as client:
        ctx = await client.fetch_x509_context()
        [jwt] = await client.fetch_jwt_svids(["payments"])
        jwt_bundles = await client.fetch_jwt_bundles()
        subject, claims = await client.validate_jwt_svid(jwt.token, "payments")
    assert [s.hint for s in ctx.svids] == ["web"]
    assert jwt.spiffe_id == SpiffeId.parse("spiffe://example.org/web") == subject
    assert validate_jwt_svid(jwt.token, "payments", jwt_bundles).spiffe_id == subject
    assert claims["aud"] == ["payments"]
    assert isinstance(jwt_bundles[TrustDomain("example.org")], JwtBundle)
