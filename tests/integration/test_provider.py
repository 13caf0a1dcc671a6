"""The embedded Workload API provider: the in-process service and the ``sds workload-api`` CLI.

The tests here start real processes (the bridge, the provider, peers), no Envoy; the others are in
``tests/unit/test_provider.py``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from sds._proto import workload_pb2 as pb
from sds._proto.workload_grpc import SpiffeWorkloadAPIStub
from sds.provider.ca import LocalCA
from tests.conftest import Processes, wait_for
from tests.harness.asuser import run_as
from tests.harness.provider import WEB, provider_args, start_provider, write_identities
from tests.harness.workload_client import (
    HEADER,
    OTHER,
    THIRD,
    TIMEOUT,
    first,
    opened,
    other_ca_jwks,
    svids_of,
)

DB = (
    "kind: workload_identity\nversion: v1\nmetadata: {name: db}\n"
    "spec:\n  spiffe: {id: /svc/db, hint: db}\n"
)


async def fetch_once(sock: Path, method: str) -> Any:
    channel = Channel(path=str(sock))
    try:
        stub = SpiffeWorkloadAPIStub(channel)
        request = {
            "FetchX509SVID": pb.X509SVIDRequest,
            "FetchX509Bundles": pb.X509BundlesRequest,
            "FetchJWTBundles": pb.JWTBundlesRequest,
        }[method]()
        return await first(getattr(stub, method), request)
    finally:
        channel.close()


async def test_cli_serves_logs_ready_and_stops_on_sigterm(
    procs: Processes, sockdir: Path, tmp_path: Path
) -> None:
    ids = write_identities(tmp_path, WEB + "---\n" + DB)
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, ids, "--ephemeral")
    assert (
        f"provider.ready socket={sock} trust_domain=example.org identities=2 federated=0 "
        "socket_mode=600"
    ) in procs.log(proc)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    response = await fetch_once(sock, "FetchX509SVID")
    assert [s.spiffe_id for s in response.svids] == [
        "spiffe://example.org/svc/web",
        "spiffe://example.org/svc/db",
    ]
    assert "svid.issued kind=x509 identity=web" in procs.log(proc)
    assert procs.stop(proc, signal.SIGTERM) == 0
    assert not sock.exists()
    assert "provider.stopped" in procs.log(proc)


async def test_cli_socket_mode_and_sigint(procs: Processes, sockdir: Path, tmp_path: Path) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, ids, "--ephemeral", "--socket-mode", "666")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o666
    assert procs.stop(proc, signal.SIGINT) == 0
    assert not sock.exists()


CLI_ERRORS: dict[str, tuple[str, list[str], str]] = {
    "bad YAML": (
        "kind: workload_identity\nversion: v1\nmetadata: {name: [web\n",
        [],
        "{ids}: document 1: line 4: invalid YAML: expected ',' or ']', but got '<stream end>'",
    ),
    "unknown attribute": (
        WEB + "  rules:\n    allow:\n      - conditions:\n"
        "          - {attribute: workload.unix.user, eq: {value: 1}}\n",
        [],
        "{ids}: document 1: spec.rules.allow[0].conditions[0].attribute: unknown attribute "
        "'workload.unix.user' (want one of workload.unix.gid, workload.unix.pid, "
        "workload.unix.uid)",
    ),
    "bad SPIFFE ID path": (
        WEB.replace("/svc/web", "svc/web"),
        [],
        "{ids}: document 1: spec.spiffe.id: SPIFFE ID path 'svc/web' must start with '/'",
    ),
    "unknown field": (
        WEB + "---\n" + DB.replace("hint: db", "hint: db, foo: 1"),
        [],
        "{ids}: document 2: spec.spiffe: unknown field 'foo' (want one of hint, id, jwt, x509)",
    ),
    "non-integer value": (
        WEB + "  rules: {allow: [{conditions: [{attribute: workload.unix.gid, "
        "in: {values: [1, staff]}}]}]}\n",
        [],
        "{ids}: document 1: spec.rules.allow[0].conditions[0].in.values[1]: want a "
        "non-negative integer or numeric string, got 'staff'",
    ),
    "duplicate name": (
        WEB + "---\n" + WEB,
        [],
        "{ids}: document 2: metadata.name: duplicate name 'web' (first in {ids}: document 1)",
    ),
    "bad federation file": (
        WEB,
        ["--federate", "other.org={bad}"],
        "{bad}: neither PEM certificates nor a SPIFFE bundle JWKS",
    ),
    "federating the own trust domain": (
        WEB,
        ["--federate", "example.org={bad}"],
        "--federate 'example.org={bad}': example.org is the provider's own trust domain",
    ),
    "bad TTL": (
        WEB,
        ["--x509-ttl", "4x"],
        "--x509-ttl: invalid duration '4x' (want e.g. 30s, 5m, 1h30m)",
    ),
    "TTL too short": (WEB, ["--jwt-ttl", "100ms"], "--jwt-ttl: must be at least 1s"),
    "bad socket mode": (
        WEB,
        ["--socket-mode", "rw"],
        "--socket-mode: want an octal mode like 600 or 666, got 'rw'",
    ),
}


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_cli_config_errors_exit_2_with_one_line(
    procs: Processes, sockdir: Path, tmp_path: Path, case: str
) -> None:
    content, extra, message = CLI_ERRORS[case]
    ids = write_identities(tmp_path, content)
    bad = tmp_path / "bad.bundle"
    bad.write_text("not a bundle\n")
    args = [a.format(bad=bad) for a in extra]
    proc = procs.sds(*provider_args(sockdir / "x.sock", ids, "--ephemeral", *args))
    assert proc.wait(30) == 2
    expected = "sds workload-api: " + message.format(ids=ids, bad=bad) + "\n"
    assert procs.log(proc) == expected
    assert not (sockdir / "x.sock").exists()


def test_cli_missing_socket_dir_exits_2_with_one_line(
    procs: Processes, sockdir: Path, tmp_path: Path
) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "missing-dir" / "w.sock"
    proc = procs.sds(*provider_args(sock, ids, "--ephemeral"))
    assert proc.wait(30) == 2
    assert procs.log(proc) == (
        f"sds workload-api: socket directory {sock.parent}: cannot open: "
        "No such file or directory\n"
    )


async def test_cli_state_dir_is_private_and_reused(
    procs: Processes, sockdir: Path, tmp_path: Path
) -> None:
    ids = write_identities(tmp_path)
    state = tmp_path / "state"
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, ids, "--state-dir", str(state))
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "jwt.key").stat().st_mode) == 0o600
    bundles = await fetch_once(sock, "FetchX509Bundles")
    jwt_bundles = await fetch_once(sock, "FetchJWTBundles")
    assert procs.stop(proc) == 0

    proc = start_provider(procs, sock, ids, "--state-dir", str(state))
    assert (await fetch_once(sock, "FetchX509Bundles")).bundles == bundles.bundles
    assert (await fetch_once(sock, "FetchJWTBundles")).bundles == jwt_bundles.bundles
    assert procs.stop(proc) == 0


async def test_cli_ephemeral_writes_nothing(
    procs: Processes, sockdir: Path, tmp_path: Path
) -> None:
    ids = write_identities(tmp_path)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    sock = sockdir / "w.sock"
    env = dict(os.environ, HOME=str(workdir), TMPDIR=str(workdir))
    proc = start_provider(procs, sock, ids, "--ephemeral", cwd=workdir, env=env)
    first_bundle = (await fetch_once(sock, "FetchX509Bundles")).bundles
    assert procs.stop(proc) == 0
    proc = start_provider(procs, sock, ids, "--ephemeral", cwd=workdir, env=env)
    assert (await fetch_once(sock, "FetchX509Bundles")).bundles != first_bundle
    assert procs.stop(proc) == 0
    assert list(workdir.iterdir()) == []
    assert list(sockdir.iterdir()) == []  # noqa: ASYNC240


async def test_cli_federation(procs: Processes, sockdir: Path, tmp_path: Path) -> None:
    ids = write_identities(tmp_path)
    other, third = LocalCA.ephemeral(OTHER), LocalCA.ephemeral(THIRD)
    (tmp_path / "other.pem").write_bytes(other.bundle.pem())
    (tmp_path / "third.json").write_bytes(other_ca_jwks(third))
    sock = sockdir / "w.sock"
    start_provider(
        procs,
        sock,
        ids,
        "--ephemeral",
        "--federate",
        f"other.org={tmp_path / 'other.pem'}",
        "--federate",
        f"spiffe://third.org={tmp_path / 'third.json'}",
    )
    svids = await fetch_once(sock, "FetchX509SVID")
    assert dict(svids.federated_bundles) == {
        "spiffe://other.org": other.bundle.der(),
        "spiffe://third.org": third.bundle.der(),
    }
    bundles = await fetch_once(sock, "FetchX509Bundles")
    assert sorted(bundles.bundles) == [
        "spiffe://example.org",
        "spiffe://other.org",
        "spiffe://third.org",
    ]
    jwt_bundles = await fetch_once(sock, "FetchJWTBundles")
    assert sorted(jwt_bundles.bundles) == ["spiffe://example.org", "spiffe://third.org"]
    assert jwt_bundles.bundles["spiffe://third.org"] == third.jwt_bundle.to_jwks()


async def test_cli_rotates_at_half_life(procs: Processes, sockdir: Path, tmp_path: Path) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "w.sock"
    start_provider(procs, sock, ids, "--ephemeral", "--x509-ttl", "4s")
    channel = Channel(path=str(sock))
    try:
        stub = SpiffeWorkloadAPIStub(channel)
        async with opened(stub.FetchX509SVID, pb.X509SVIDRequest()) as stream:
            async with asyncio.timeout(TIMEOUT):
                old = svids_of(await stream.recv_message())[0]
            arrived = time.monotonic()
            # Half of the 4 s lifetime, plus one second of slack.
            async with asyncio.timeout(2.0 + 1.0):
                new = svids_of(await stream.recv_message())[0]
            elapsed = time.monotonic() - arrived
    finally:
        channel.close()
    assert new.serial != old.serial
    assert new.spiffe_id == old.spiffe_id
    assert new.not_after > old.not_after
    assert elapsed < 3.0


async def test_cli_sighup_reload(procs: Processes, sockdir: Path, tmp_path: Path) -> None:
    idsdir = tmp_path / "ids"
    idsdir.mkdir()
    (idsdir / "10-web.yaml").write_text(WEB)
    partner = tmp_path / "partner.pem"
    old_ca, new_ca = LocalCA.ephemeral(OTHER), LocalCA.ephemeral(OTHER)
    partner.write_bytes(old_ca.bundle.pem())
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, idsdir, "--ephemeral", "--federate", f"other.org={partner}")
    channel = Channel(path=str(sock))
    try:
        stub = SpiffeWorkloadAPIStub(channel)
        async with opened(stub.FetchX509SVID, pb.X509SVIDRequest()) as stream:
            async with asyncio.timeout(TIMEOUT):
                before = await stream.recv_message()
                assert [s.hint for s in before.svids] == ["web"]
                assert before.federated_bundles["spiffe://other.org"] == old_ca.bundle.der()
                (idsdir / "20-db.yaml").write_text(DB)
                partner.write_bytes(new_ca.bundle.pem())
                os.kill(proc.pid, signal.SIGHUP)
                after = await stream.recv_message()
            assert [s.hint for s in after.svids] == ["web", "db"]
            assert after.svids[0].x509_svid == before.svids[0].x509_svid
            assert after.federated_bundles["spiffe://other.org"] == new_ca.bundle.der()

            # A bad reload logs one error line and keeps serving the old state.
            bad = idsdir / "30-bad.yaml"
            bad.write_text(DB.replace("name: db", "name: bad").replace("hint: db", "hnit: db"))
            os.kill(proc.pid, signal.SIGHUP)
            wait_for(lambda: "provider.reload_failed" in procs.log(proc), what="reload error")
    finally:
        channel.close()
    failures = [line for line in procs.log(proc).splitlines() if "reload_failed" in line]
    assert len(failures) == 1
    assert failures[0].endswith(
        f'ERROR sds.provider provider.reload_failed error="{bad}: document 1: spec.spiffe: '
        "unknown field 'hnit' (want one of hint, id, jwt, x509)\""
    )
    still = await fetch_once(sock, "FetchX509SVID")
    assert [s.hint for s in still.svids] == ["web", "db"]


async def _fetch_svids(path: str) -> dict[str, Any]:
    out: dict[str, Any] = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
    channel = Channel(path=path)
    try:
        stub = SpiffeWorkloadAPIStub(channel)
        async with stub.FetchX509SVID.open(metadata=HEADER) as stream:
            await stream.send_message(pb.X509SVIDRequest(), end=True)
            response = await asyncio.wait_for(stream.recv_message(), 10)
            await stream.cancel()
        out["ids"] = [s.spiffe_id for s in response.svids]
    except GRPCError as exc:
        out["status"] = exc.status.name
        out["message"] = exc.message
    finally:
        channel.close()
    return out


def fetch_svids(path: str) -> dict[str, Any]:
    """FetchX509SVID once as whoever runs this (see tests/harness/asuser.py); what came back."""
    return asyncio.run(_fetch_svids(path))


@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another uid needs root")
def test_attestation_by_uid_across_processes(
    procs: Processes, sockdir: Path, tmp_path: Path
) -> None:
    ids = tmp_path / "ids.yaml"
    ids.write_text(
        WEB.replace("name: web", "name: u1000").replace("/svc/web", "/svc/u1000")
        + "  rules: {allow: [{conditions: [{attribute: workload.unix.uid, eq: {value: 1000}}]}]}\n"
    )
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, ids, "--ephemeral", "--socket-mode", "666")
    allowed = run_as(1000, fetch_svids, str(sock))
    assert allowed["uid"] == 1000
    assert allowed.get("ids") == ["spiffe://example.org/svc/u1000"], allowed
    denied = run_as(1001, fetch_svids, str(sock))
    assert denied["status"] == "PERMISSION_DENIED", denied
    assert denied["message"] == (
        f"no identity issued: caller pid={denied['pid']} uid=1001 gid=1001 "
        "matches no workload_identity rule"
    )
    log = procs.log(proc)
    assert f"pid={allowed['pid']} uid=1000 gid=1000" in log
    assert (
        f"workload.denied method=FetchX509SVID pid={denied['pid']} uid=1001 gid=1001 "
        'reason="matches no workload_identity rule"'
    ) in log
