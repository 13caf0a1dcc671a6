"""The provider's Delegated Identity API (``sds workload-api --admin-socket``), as SPIRE serves it.

The provider runs as a subprocess; this test process (root, uid 0) is the
authorized delegate, and the workloads it names by pid are ``sleep`` children
running as other uids. Calls go through the generated grpclib stub, so the
wire shape is SPIRE v1.13.3's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from sds._proto import delegatedidentity_pb2 as dpb
from sds._proto.delegatedidentity_grpc import DelegatedIdentityStub
from sds.provider.app import MSG_ADMIN_DIR
from sds.provider.delegated import (
    MSG_CALLER_GONE,
    MSG_EITHER,
    MSG_NO_IDENTITY,
    MSG_NOT_DELEGATE,
    MSG_SELECTORS,
)
from sds.provider.service import MAX_REQUEST_BYTES
from tests.conftest import Processes, wait_for
from tests.harness.asuser import arun_as
from tests.harness.h2raw import RawH2, grpc_frame
from tests.harness.provider import provider_args, start_federated_provider, write_identities

TIMEOUT = 10.0
WEB_UID = 1000
DB_UID = 1001
NOBODY_UID = 1002


def _identity(name: str, uid: int, extra: str = "") -> str:
    return (
        f"kind: workload_identity\nversion: v1\nmetadata: {{name: {name}}}\n"
        f"spec:\n  spiffe: {{id: /svc/{name}, hint: {name}{extra}}}\n"
        "  rules: {allow: [{conditions: [{attribute: workload.unix.uid, "
        f"eq: {{value: {uid}}}}}]}}]}}\n"
    )


# The delegate (this process, uid 0), web (uid 1000, 2 s SVIDs: rotation is seen) and db.
IDENTITIES = (
    _identity("bridge", 0)
    + "---\n"
    + _identity("web", WEB_UID, ", x509: {maximum_ttl: 2s}")
    + "---\n"
    + _identity("db", DB_UID)
)
DELEGATE = "spiffe://example.org/svc/bridge"


class Admin:
    """A started provider with its Workload API socket and admin socket."""

    def __init__(self, procs: Processes, proc: Any, workload: Path, admin: Path) -> None:
        self.procs = procs
        self.proc = proc
        self.workload = workload
        self.path = admin


@pytest.fixture
def admin(procs: Processes, sockdir: Path, tmp_path: Path) -> Admin:
    workload_dir = sockdir / "workload"
    workload_dir.mkdir(mode=0o755)
    workload, path = workload_dir / "w.sock", sockdir / "admin.sock"
    extra = (
        "--admin-socket",
        str(path),
        "--admin-socket-mode",
        "666",  # the non-delegate tests connect as other uids
        "--authorized-delegate",
        DELEGATE,
    )
    proc = start_federated_provider(procs, workload, tmp_path, IDENTITIES, *extra)
    wait_for(lambda: "provider.admin_ready" in procs.log(proc), TIMEOUT, "provider.admin_ready")
    return Admin(procs, proc, workload, path)


@pytest.fixture
def children(procs: Processes) -> Any:
    """``start(uid)``: a ``sleep`` child running as ``uid`` (stopped with the test)."""

    def start(uid: int) -> subprocess.Popen[bytes]:
        return procs.start(["sleep", "300"], f"sleep-{uid}", user=uid, group=uid, extra_groups=[])

    return start


@contextlib.asynccontextmanager
async def _stub(path: Path) -> AsyncIterator[DelegatedIdentityStub]:
    """A stub on a fresh channel to the admin socket, closed on the way out."""
    channel = Channel(path=str(path))
    try:
        yield DelegatedIdentityStub(channel)
    finally:
        channel.close()


async def _messages(method: Any, request: Any, count: int) -> list[Any]:
    """The first ``count`` messages of a server stream (fewer if it ends first)."""
    out: list[Any] = []
    async with method.open() as stream, asyncio.timeout(TIMEOUT):
        await stream.send_message(request, end=True)
        while len(out) < count:
            message = await stream.recv_message()
            if message is None:
                break
            out.append(message)
        if len(out) < count:
            await stream.recv_trailing_metadata()  # GRPCError unless it ended with OK
        else:
            await stream.cancel()
    return out


async def _drain(stream: Any) -> None:
    """Read a stream to its end; GRPCError unless it ended with OK."""
    while await stream.recv_message() is not None:
        pass
    await stream.recv_trailing_metadata()


def _status(exc: GRPCError) -> tuple[Status, str | None]:
    return exc.status, exc.message


async def _x509_error(path: Path, request: dpb.SubscribeToX509SVIDsRequest) -> tuple[Any, ...]:
    async with _stub(path) as stub:
        with pytest.raises(GRPCError) as caught:
            await _messages(stub.SubscribeToX509SVIDs, request, 1)
    return _status(caught.value)


def _check_svid(svid: dpb.X509SVIDWithKey, path: str) -> x509.Certificate:
    assert svid.x509_svid.id.trust_domain == "example.org"
    assert svid.x509_svid.id.path == path
    leaf = x509.load_der_x509_certificate(svid.x509_svid.cert_chain[0])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://example.org{path}"
    ]
    key = serialization.load_der_private_key(svid.x509_svid_key, None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(serialization.Encoding.DER, spki) == (
        leaf.public_key().public_bytes(serialization.Encoding.DER, spki)
    )
    assert svid.x509_svid.expires_at == int(leaf.not_valid_after_utc.timestamp())
    return leaf


async def test_delegate_gets_the_childs_svid_renewed_and_the_stream_ends_at_exit(
    admin: Admin, children: Any
) -> None:
    web = children(WEB_UID)
    async with _stub(admin.path) as stub:
        request = dpb.SubscribeToX509SVIDsRequest(pid=web.pid)
        async with stub.SubscribeToX509SVIDs.open() as stream, asyncio.timeout(TIMEOUT):
            await stream.send_message(request, end=True)
            first = await stream.recv_message()
            assert first is not None
            assert [s.x509_svid.hint for s in first.x509_svids] == ["web"]  # not the delegate's
            leaf = _check_svid(first.x509_svids[0], "/svc/web")
            assert list(first.federates_with) == ["spiffe://partner.org"]
            # 2 s SVIDs are renewed at half-life, on the same stream.
            second = await stream.recv_message()
            assert second is not None
            renewed = _check_svid(second.x509_svids[0], "/svc/web")
            assert renewed.serial_number != leaf.serial_number
            # The pid may be reused once the child exits: the stream ends then.
            web.kill()
            web.wait()
            while (message := await stream.recv_message()) is not None:
                assert message.x509_svids  # a renewal that raced the exit
            await stream.recv_trailing_metadata()  # status OK: GRPCError otherwise
    wait_for(
        lambda: (
            f"delegate.workload_exited method=SubscribeToX509SVIDs pid={web.pid}"
            in admin.procs.log(admin.proc)
        ),
        TIMEOUT,
        "delegate.workload_exited",
    )


async def test_the_pidfd_ends_the_stream_at_once_not_the_next_renewal(
    admin: Admin, children: Any
) -> None:
    db = children(DB_UID)  # a 1 h SVID: nothing but the exit wakes its stream
    async with (
        _stub(admin.path) as stub,
        stub.SubscribeToX509SVIDs.open() as stream,
        asyncio.timeout(TIMEOUT),
    ):
        await stream.send_message(dpb.SubscribeToX509SVIDsRequest(pid=db.pid), end=True)
        assert await stream.recv_message() is not None
        db.kill()
        db.wait()
        async with asyncio.timeout(2.0):
            await _drain(stream)


async def test_each_pid_gets_its_own_identity_and_an_unentitled_one_an_empty_list(
    admin: Admin, children: Any
) -> None:
    db, nobody = children(DB_UID), children(NOBODY_UID)
    async with _stub(admin.path) as stub:
        (db_first,) = await _messages(
            stub.SubscribeToX509SVIDs, dpb.SubscribeToX509SVIDsRequest(pid=db.pid), 1
        )
        (none_first,) = await _messages(
            stub.SubscribeToX509SVIDs, dpb.SubscribeToX509SVIDsRequest(pid=nobody.pid), 1
        )
    _check_svid(db_first.x509_svids[0], "/svc/db")
    assert len(db_first.x509_svids) == 1
    assert list(none_first.x509_svids) == []
    assert list(none_first.federates_with) == []


async def test_an_exited_pid_is_a_failed_attestation(admin: Admin, children: Any) -> None:
    gone = children(WEB_UID)
    gone.kill()
    gone.wait()  # reaped: the pid names no process now
    async with _stub(admin.path) as stub:
        # SPIRE's workload attestor turns a failed attestation into no selectors.
        messages = await _messages(
            stub.SubscribeToX509SVIDs, dpb.SubscribeToX509SVIDsRequest(pid=gone.pid), 5
        )
        assert [list(m.x509_svids) for m in messages] == [[]]  # one empty answer, then the end
        with pytest.raises(GRPCError) as caught:
            await stub.FetchJWTSVIDs(dpb.FetchJWTSVIDsRequest(audience=["a"], pid=gone.pid))
    assert _status(caught.value) == (Status.PERMISSION_DENIED, MSG_NO_IDENTITY)


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({}, MSG_EITHER),
        ({"pid": 1, "selectors": [dpb.Selector(type="unix", value="uid:1000")]}, MSG_EITHER),
        ({"selectors": [dpb.Selector(type="unix", value="uid:1000")]}, MSG_SELECTORS),
    ],
    ids=["neither", "both", "selectors"],
)
async def test_workload_named_by_exactly_one_pid(
    admin: Admin, request_fields: dict[str, Any], message: str
) -> None:
    assert await _x509_error(admin.path, dpb.SubscribeToX509SVIDsRequest(**request_fields)) == (
        Status.INVALID_ARGUMENT,
        message,
    )
    async with _stub(admin.path) as stub:
        with pytest.raises(GRPCError) as caught:
            await stub.FetchJWTSVIDs(dpb.FetchJWTSVIDsRequest(audience=["a"], **request_fields))
    assert _status(caught.value) == (Status.INVALID_ARGUMENT, message)


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


async def test_jwt_svid_by_pid_and_bundles_keyed_by_trust_domain_id(
    admin: Admin, children: Any
) -> None:
    web = children(WEB_UID)
    async with _stub(admin.path) as stub:
        response = await stub.FetchJWTSVIDs(
            dpb.FetchJWTSVIDsRequest(audience=["spiffe://example.org/db", "x"], pid=web.pid)
        )
        with pytest.raises(GRPCError) as no_audience:
            await stub.FetchJWTSVIDs(dpb.FetchJWTSVIDsRequest(pid=web.pid))
        (x509_bundles,) = await _messages(
            stub.SubscribeToX509Bundles, dpb.SubscribeToX509BundlesRequest(), 1
        )
        (jwt_bundles,) = await _messages(
            stub.SubscribeToJWTBundles, dpb.SubscribeToJWTBundlesRequest(), 1
        )
    (svid,) = response.svids
    claims = _claims(svid.token)
    assert claims["sub"] == "spiffe://example.org/svc/web"
    assert claims["aud"] == ["spiffe://example.org/db", "x"]
    assert (svid.id.trust_domain, svid.id.path, svid.hint) == ("example.org", "/svc/web", "web")
    assert (svid.issued_at, svid.expires_at) == (claims["iat"], claims["exp"])
    assert _status(no_audience.value) == (Status.INVALID_ARGUMENT, "audience must be specified")

    assert sorted(x509_bundles.ca_certificates) == ["spiffe://example.org", "spiffe://partner.org"]
    for der in x509_bundles.ca_certificates.values():
        assert x509.load_der_x509_certificate(der).extensions  # one CA certificate each
    assert sorted(jwt_bundles.bundles) == ["spiffe://example.org"]  # partner.org: PEM only
    assert json.loads(jwt_bundles.bundles["spiffe://example.org"])["keys"]


def _call_as_other_uid(path: str, pid: int) -> tuple[int, str | None]:
    """In a child as another uid: SubscribeToX509SVIDs for ``pid``; the status it gets."""

    async def call() -> tuple[int, str | None]:
        channel = Channel(path=path)
        try:
            stub = DelegatedIdentityStub(channel)
            async with stub.SubscribeToX509SVIDs.open() as stream, asyncio.timeout(TIMEOUT):
                await stream.send_message(dpb.SubscribeToX509SVIDsRequest(pid=pid), end=True)
                await stream.recv_message()
        except GRPCError as exc:
            return exc.status.value, exc.message
        finally:
            channel.close()
        return 0, None

    return asyncio.run(call())


async def test_only_authorized_delegates_may_call(admin: Admin, children: Any) -> None:
    web = children(WEB_UID)
    assert stat.S_IMODE(os.stat(admin.path).st_mode) == 0o666
    # web holds an identity, but not one listed in --authorized-delegate.
    assert await arun_as(WEB_UID, _call_as_other_uid, str(admin.path), web.pid) == (
        Status.PERMISSION_DENIED.value,
        MSG_NOT_DELEGATE,
    )
    assert await arun_as(NOBODY_UID, _call_as_other_uid, str(admin.path), web.pid) == (
        Status.PERMISSION_DENIED.value,
        MSG_NO_IDENTITY,
    )


class _SocketChannel(Channel):
    """A grpclib channel over one already connected Unix socket (grpclib only dials paths)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(path="/nonexistent")
        self._sock = sock

    async def _create_connection(self) -> Any:
        _, protocol = await self._loop.create_unix_connection(
            self._protocol_factory, sock=self._sock
        )
        return protocol


def _connected_by_a_process_that_exits(path: Path) -> tuple[socket.socket, int]:
    """A socket connected to ``path`` by a forked child that handed it over and was reaped."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(str(path))
            socket.send_fds(theirs, [b"x"], [conn.fileno()])
        finally:
            os._exit(0)
    try:
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    finally:
        ours.close()
        theirs.close()
        os.waitpid(pid, 0)
    conn = socket.socket(fileno=fds[0])
    conn.setblocking(False)
    return conn, pid


async def test_a_caller_whose_process_is_gone_is_unauthenticated(
    admin: Admin, children: Any
) -> None:
    web = children(WEB_UID)
    conn, pid = _connected_by_a_process_that_exits(admin.path)
    channel = _SocketChannel(conn)
    try:
        stub = DelegatedIdentityStub(channel)
        with pytest.raises(GRPCError) as caught:
            await _messages(
                stub.SubscribeToX509SVIDs, dpb.SubscribeToX509SVIDsRequest(pid=web.pid), 1
            )
    finally:
        channel.close()
    assert _status(caught.value) == (
        Status.UNAUTHENTICATED,
        f"{MSG_CALLER_GONE}: process {pid} has exited",
    )


async def test_reload_that_drops_the_delegate_ends_its_stream(
    admin: Admin, children: Any, tmp_path: Path
) -> None:
    db = children(DB_UID)
    async with (
        _stub(admin.path) as stub,
        stub.SubscribeToX509SVIDs.open() as stream,
        asyncio.timeout(TIMEOUT),
    ):
        await stream.send_message(dpb.SubscribeToX509SVIDsRequest(pid=db.pid), end=True)
        assert await stream.recv_message() is not None
        write_identities(tmp_path, IDENTITIES.replace("value: 0}", "value: 4242}"))
        os.kill(admin.proc.pid, signal.SIGHUP)
        with pytest.raises(GRPCError) as caught:
            await _drain(stream)
    assert _status(caught.value) == (Status.PERMISSION_DENIED, MSG_NO_IDENTITY)


async def test_stop_ends_streams_and_removes_both_sockets(admin: Admin, children: Any) -> None:
    db = children(DB_UID)
    async with (
        _stub(admin.path) as stub,
        stub.SubscribeToX509SVIDs.open() as stream,
        asyncio.timeout(TIMEOUT),
    ):
        await stream.send_message(dpb.SubscribeToX509SVIDsRequest(pid=db.pid), end=True)
        assert await stream.recv_message() is not None
        os.kill(admin.proc.pid, signal.SIGTERM)
        with pytest.raises(GRPCError) as caught:
            await _drain(stream)
    assert caught.value.status == Status.UNAVAILABLE
    assert admin.proc.wait(TIMEOUT) == 0
    assert not admin.path.exists()
    assert not admin.workload.exists()


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("same", MSG_ADMIN_DIR),
        ("below", MSG_ADMIN_DIR),
        ("no-socket", "--authorized-delegate: needs --admin-socket to serve the delegates on"),
        (
            "bad-delegate",
            "--authorized-delegate 'spiffe://other.org/x': not in the trust domain example.org",
        ),
    ],
)
def test_admin_config_errors_exit_2_with_one_line(
    procs: Processes, sockdir: Path, tmp_path: Path, where: str, message: str
) -> None:
    ids = write_identities(tmp_path, IDENTITIES)
    workload = sockdir / "w.sock"
    admin_path = {"same": sockdir / "a.sock", "below": sockdir / "sub" / "a.sock"}.get(where)
    extra = ["--authorized-delegate", DELEGATE]
    if admin_path is not None:
        extra += ["--admin-socket", str(admin_path)]
    if where == "bad-delegate":
        extra = [
            "--admin-socket",
            str(tmp_path / "a.sock"),
            "--authorized-delegate",
            "spiffe://other.org/x",
        ]
    proc = procs.sds(*provider_args(workload, ids, "--ephemeral", *extra))
    assert proc.wait(30) == 2
    assert procs.log(proc) == f"sds workload-api: {message}\n"
    assert not workload.exists()


def test_an_admin_socket_that_cannot_be_bound_stops_the_provider(
    procs: Processes, sockdir: Path, tmp_path: Path
) -> None:
    ids = write_identities(tmp_path, IDENTITIES)
    workload_dir = sockdir / "workload"
    workload_dir.mkdir(mode=0o755)
    workload, admin_path = workload_dir / "w.sock", sockdir / "missing" / "a.sock"
    extra = ["--admin-socket", str(admin_path), "--authorized-delegate", DELEGATE]
    proc = procs.sds(*provider_args(workload, ids, "--ephemeral", *extra))
    assert proc.wait(30) == 2
    assert procs.log(proc).endswith(
        f"sds workload-api: socket directory {admin_path.parent}: cannot open: "
        "No such file or directory\n"
    )
    assert not workload.exists()  # the Workload API was bound first, and closed again


JWT_SVIDS = "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/FetchJWTSVIDs"


async def test_requests_are_bounded_like_the_workload_apis(admin: Admin, children: Any) -> None:
    web = children(WEB_UID)

    def oversized() -> tuple[str | None, str | None, int]:
        with RawH2(str(admin.path)) as client:
            chunk = b"\0" * 16384
            response = client.call(JWT_SVIDS, [grpc_frame(b"", length=1 << 30), *[chunk] * 8])
        return response.grpc_status, response.grpc_message, response.sent

    status, message, sent = await asyncio.to_thread(oversized)
    assert (status, message) == (
        str(Status.RESOURCE_EXHAUSTED.value),
        f"request message is {1 << 30} bytes; the limit is {MAX_REQUEST_BYTES}",
    )
    assert sent <= 65535
    async with _stub(admin.path) as stub:
        for audience, expected in (
            (["a"] * 17, "at most 16 audiences per request"),
            (["x" * 1025], "an audience is at most 1024 bytes"),
        ):
            with pytest.raises(GRPCError) as caught:
                await stub.FetchJWTSVIDs(dpb.FetchJWTSVIDsRequest(audience=audience, pid=web.pid))
            assert _status(caught.value) == (Status.INVALID_ARGUMENT, expected)
    assert "Traceback" not in admin.procs.log(admin.proc)
