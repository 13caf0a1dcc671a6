"""The provider against a hostile local user and badly behaved clients (issues 7 and 9)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from sds._proto import workload_pb2 as pb
from sds._proto.workload_grpc import SpiffeWorkloadAPIStub
from sds._util.peercred import (
    listen_unix,
    open_private_dir,
    read_private_file,
    write_private_file,
)
from sds.errors import SocketInUse, UnsafePath
from sds.provider import service as provider_server
from sds.provider.ca import LocalCA
from sds.provider.identities import Identity
from sds.provider.service import MAX_REQUEST_BYTES, WorkloadApiProvider
from sds.spiffe.id import SpiffeId, TrustDomain
from tests.conftest import Processes, captured_log, short_tmp, wait_for
from tests.harness.asuser import run_as
from tests.harness.fake_workload_api import eventually
from tests.harness.h2async import RawClient, stall_in_preface
from tests.harness.h2raw import RawH2, grpc_frame
from tests.unit.test_provider import WEB, provider_args, start_provider, write_identities
from tests.unit.test_sds_hostile import fd_count

pytestmark = pytest.mark.hostile

TD = TrustDomain("example.org")
HEADER = {"workload.spiffe.io": "true"}
ATTACKER = 1000
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another uid needs root")


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A sticky, world-writable directory like /tmp, where another uid can plant things."""
    with short_tmp("sds-pub-", 0o1777) as path:
        yield path


def fails_with(procs: Processes, args: list[str], message: str) -> None:
    proc = procs.sds(*args)
    assert proc.wait(30) == 2, procs.log(proc)
    assert procs.log(proc) == f"sds workload-api: {message}\n"


# ---------------------------------------------------------------------------
# Issue 7, hole 1: the state directory


def _plant(state: str) -> None:
    os.mkdir(state)
    os.chmod(state, 0o777)
    os.symlink(os.path.join(state, "loot"), os.path.join(state, "ca.key.tmp"))
    os.symlink(os.path.join(state, "loot"), os.path.join(state, "ca.tmp"))


@needs_root
def test_state_dir_precreated_by_another_uid_is_refused_and_no_key_is_written(
    procs: Processes, public_tmp: Path, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    state = public_tmp / "state"
    run_as(ATTACKER, _plant, str(state))
    fails_with(
        procs,
        provider_args(sockdir / "w.sock", ids, "--state-dir", str(state)),
        f"{state}: owned by uid {ATTACKER}, not by us (uid 0); "
        "use a directory we own with mode 0700",
    )
    assert sorted(os.listdir(state)) == ["ca.key.tmp", "ca.tmp"]
    assert not (state / "loot").exists()
    assert stat.S_IMODE(state.stat().st_mode) == 0o777  # left as found, not "fixed"


def test_state_dir_open_to_others_is_refused_even_if_ours(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    fails_with(
        procs,
        provider_args(sockdir / "w.sock", ids, "--state-dir", str(state)),
        f"{state}: mode 755 lets group or others in; want 0700",
    )
    assert list(state.iterdir()) == []


def test_state_dir_that_is_a_symlink_is_refused(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "state"
    link.symlink_to(real)
    fails_with(
        procs,
        provider_args(sockdir / "w.sock", ids, "--state-dir", str(link)),
        f"{link}: is a symbolic link; give the directory itself",
    )
    assert list(real.iterdir()) == []


def test_state_dir_is_created_0700_with_keys_0600(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    ca = LocalCA.load_or_create(TD, state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert sorted(os.listdir(state)) == ["ca.crt", "ca.key", "jwt.key"]
    for name in ("ca.key", "jwt.key"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    assert LocalCA.load_or_create(TD, state).bundle.der() == ca.bundle.der()


def test_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    LocalCA.load_or_create(TD, state)
    elsewhere = tmp_path / "elsewhere.key"
    (state / "ca.key").rename(elsewhere)
    (state / "ca.key").symlink_to(elsewhere)
    with pytest.raises(UnsafePath) as info:
        LocalCA.load_or_create(TD, state)
    assert str(info.value) == f"{state}/ca.key: is a symbolic link; refusing it"


def test_private_write_never_follows_a_planted_temp_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"untouched")
    state = tmp_path / "state"
    fd = open_private_dir(str(state))
    try:
        os.symlink(target, "k.tmp", dir_fd=fd)
        write_private_file(fd, "k", b"secret")
        assert read_private_file(fd, "k", where=str(state)) == b"secret"
    finally:
        os.close(fd)
    assert target.read_bytes() == b"untouched"
    assert sorted(os.listdir(state)) == ["k"]
    assert stat.S_IMODE((state / "k").stat().st_mode) == 0o600


def test_fifo_in_state_dir_is_refused_without_hanging(tmp_path: Path) -> None:
    state = tmp_path / "state"
    os.close(open_private_dir(str(state)))
    os.mkfifo(state / "ca.key", 0o600)
    with pytest.raises(UnsafePath) as info:
        LocalCA.load_or_create(TD, state)
    assert str(info.value) == f"{state}/ca.key: not a regular file"


# ---------------------------------------------------------------------------
# Issue 7, hole 3 and issue 9, item 2: the socket directory and the socket path


@needs_root
def test_socket_dir_owned_by_another_uid_is_refused(
    procs: Processes, public_tmp: Path, tmp_path: Path
) -> None:
    ids = write_identities(tmp_path)
    theirs = public_tmp / "run"
    run_as(ATTACKER, os.mkdir, str(theirs), 0o755)
    fails_with(
        procs,
        provider_args(theirs / "w.sock", ids, "--ephemeral"),
        f"socket directory {theirs}: owned by uid {ATTACKER}, not by us (uid 0) or root; "
        "use a directory we own",
    )
    assert os.listdir(theirs) == []


def test_world_writable_socket_dir_without_sticky_bit_is_refused(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    os.chmod(sockdir, 0o777)
    fails_with(
        procs,
        provider_args(sockdir / "w.sock", ids, "--ephemeral"),
        f"socket directory {sockdir}: mode 777 lets others replace the socket; "
        "remove group/other write or set the sticky bit",
    )
    assert os.listdir(sockdir) == []


def test_sticky_world_writable_socket_dir_is_accepted(public_tmp: Path) -> None:
    listener = listen_unix(str(public_tmp / "w.sock"))
    try:
        assert stat.S_ISSOCK(os.lstat(public_tmp / "w.sock").st_mode)
        assert stat.S_IMODE(os.lstat(public_tmp / "w.sock").st_mode) == 0o600
    finally:
        listener.sock.close()
        assert listener.remove()


def test_second_provider_on_a_live_socket_exits_2_and_the_first_keeps_serving(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "w.sock"
    first = start_provider(procs, sock, ids, "--ephemeral")
    inode = os.lstat(sock).st_ino
    fails_with(
        procs,
        provider_args(sock, ids, "--ephemeral"),
        f"{sock}: another server is already listening there; "
        "stop it or choose another --socket path",
    )
    assert os.lstat(sock).st_ino == inode
    probe = socket.socket(socket.AF_UNIX)
    probe.connect(str(sock))
    probe.close()
    assert procs.stop(first) == 0
    assert not sock.exists()


def test_stale_socket_is_replaced_and_other_files_are_refused(sockdir: Path) -> None:
    path = sockdir / "w.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # a socket file nobody listens on
    listener = listen_unix(str(path))
    listener.sock.close()
    assert listener.remove()
    path.write_text("not a socket")
    with pytest.raises(UnsafePath) as info:
        listen_unix(str(path))
    assert str(info.value) == f"{path}: exists and is not a socket"
    assert path.read_text() == "not a socket"


def test_live_socket_is_refused_in_process(sockdir: Path) -> None:
    path = str(sockdir / "w.sock")
    listener = listen_unix(path)
    try:
        with pytest.raises(SocketInUse):
            listen_unix(path)
    finally:
        listener.sock.close()
        listener.remove()


async def test_close_leaves_a_socket_that_is_no_longer_ours(sockdir: Path) -> None:
    path = sockdir / "w.sock"
    provider = WorkloadApiProvider(LocalCA.ephemeral(TD), [])
    await provider.start(listen_unix(str(path)))
    path.unlink()  # someone else took the path over
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    try:
        await provider.close()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        other.close()


# ---------------------------------------------------------------------------
# Issue 7, hole 6 and issue 9, items 9 and 13: gRPC edges


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


ONLY_1000 = (
    WEB + "  rules: {allow: [{conditions: [{attribute: workload.unix.uid, eq: {value: 1000}}]}]}\n"
)
FLOOD = 160 * 1024 * 1024
CHUNK = b"\0" * (1024 * 1024)
JWT = "/SpiffeWorkloadAPI/FetchJWTSVID"


async def _served_once(sock: Path) -> None:
    channel = Channel(path=str(sock))
    try:
        with pytest.raises(GRPCError):
            await SpiffeWorkloadAPIStub(channel).FetchJWTSVID(
                pb.JWTSVIDRequest(audience=["a"]), metadata=HEADER
            )
    finally:
        channel.close()


async def test_non_entitled_flood_is_refused_before_reading_and_rss_stays_flat(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path, ONLY_1000)  # we (uid 0) are not entitled
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, ids, "--ephemeral", "--socket-mode", "666")
    await _served_once(sock)  # warm up every code path once
    baseline = rss_kib(proc.pid)

    def flood() -> list[tuple[str | None, int]]:
        results = []
        with RawH2(str(sock)) as client:
            for _ in range(4):
                response = client.call(
                    JWT, [grpc_frame(b"", length=0xFFFFFFFF), *[CHUNK] * 40], metadata=HEADER
                )
                results.append((response.grpc_status, response.sent))
        return results

    results = await asyncio.to_thread(flood)
    assert [status for status, _ in results] == [str(Status.PERMISSION_DENIED.value)] * 4
    # The server read nothing: at most one 64 KiB receive window got through per call.
    assert all(sent <= 65535 for _, sent in results), results
    growth = rss_kib(proc.pid) - baseline
    assert growth < 16 * 1024, f"provider RSS grew by {growth} KiB"
    assert "Traceback" not in procs.log(proc)


async def test_oversized_request_is_resource_exhausted_from_its_prefix(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, ids, "--ephemeral")

    def call() -> tuple[str | None, str | None, int]:
        with RawH2(str(sock)) as client:
            response = client.call(
                JWT, [grpc_frame(b"", length=1 << 30), *[CHUNK] * 8], metadata=HEADER
            )
        return response.grpc_status, response.grpc_message, response.sent

    status, message, sent = await asyncio.to_thread(call)
    assert status == str(Status.RESOURCE_EXHAUSTED.value)
    assert message == f"request message is {1 << 30} bytes; the limit is {MAX_REQUEST_BYTES}"
    assert sent <= 65535
    assert "Traceback" not in procs.log(proc)


@pytest.mark.parametrize(
    ("audience", "message"),
    [
        (["a"] * 17, "at most 16 audiences per request"),
        (["x" * 1025], "an audience is at most 1024 bytes"),
    ],
)
async def test_jwt_audience_caps(
    procs: Processes, tmp_path: Path, sockdir: Path, audience: list[str], message: str
) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "w.sock"
    start_provider(procs, sock, ids, "--ephemeral")
    channel = Channel(path=str(sock))
    try:
        with pytest.raises(GRPCError) as info:
            await SpiffeWorkloadAPIStub(channel).FetchJWTSVID(
                pb.JWTSVIDRequest(audience=audience), metadata=HEADER
            )
        assert (info.value.status, info.value.message) == (Status.INVALID_ARGUMENT, message)
        ok = await SpiffeWorkloadAPIStub(channel).FetchJWTSVID(
            pb.JWTSVIDRequest(audience=["a"] * 16), metadata=HEADER
        )
        assert len(ok.svids) == 1
    finally:
        channel.close()


MALFORMED: dict[str, tuple[str, list[bytes], str]] = {
    "garbage protobuf": (
        JWT,
        [grpc_frame(b"\xff\xff\xff\xff")],
        "request is not a valid JWTSVIDRequest",
    ),
    "truncated frame": (
        JWT,
        [grpc_frame(b"", length=10) + b"abc"],
        "request ended inside a gRPC message frame",
    ),
    "truncated prefix": (JWT, [b"\0\0"], "request ended inside a gRPC message frame"),
    "compressed flag": (
        JWT,
        [grpc_frame(b"", compressed=True)],
        "compressed request messages are not supported (no grpc-encoding negotiated)",
    ),
    "bad flag": (JWT, [b"\x07" + grpc_frame(b"")[1:]], "invalid gRPC message flag 7"),
    "no message (unary)": (JWT, [], "request message missing"),
    "no message (stream)": ("/SpiffeWorkloadAPI/FetchX509SVID", [], "request message missing"),
    "garbage on a stream": (
        "/SpiffeWorkloadAPI/FetchX509Bundles",
        [grpc_frame(b"\x0a")],
        "request is not a valid X509BundlesRequest",
    ),
}


async def test_malformed_frames_and_protobuf_are_invalid_argument_without_traceback(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, ids, "--ephemeral")

    def calls() -> dict[str, tuple[str | None, str | None]]:
        out = {}
        with RawH2(str(sock)) as client:
            for case, (path, chunks, _) in MALFORMED.items():
                response = client.call(path, chunks, metadata=HEADER)
                out[case] = (response.grpc_status, response.grpc_message)
        return out

    got = await asyncio.to_thread(calls)
    invalid = str(Status.INVALID_ARGUMENT.value)
    assert got == {case: (invalid, message) for case, (_, _, message) in MALFORMED.items()}
    channel = Channel(path=str(sock))  # still serving
    try:
        ok = await SpiffeWorkloadAPIStub(channel).FetchJWTSVID(
            pb.JWTSVIDRequest(audience=["a"]), metadata=HEADER
        )
        assert len(ok.svids) == 1
    finally:
        channel.close()
    log = procs.log(proc)
    assert "Traceback" not in log and "Application error" not in log, log


async def test_unknown_method_is_unimplemented_with_grpc_content_type(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, ids, "--ephemeral")
    path = "/SpiffeWorkloadAPI/FetchWITSVID"

    def call() -> tuple[dict[str, str], dict[str, str]]:
        with RawH2(str(sock)) as client:
            response = client.call(path, [grpc_frame(b"")], metadata=HEADER)
        return response.headers, response.trailers

    headers, trailers = await asyncio.to_thread(call)
    # A trailers-only response: grpc-go reads the status from these headers only
    # when they carry a gRPC content-type.
    assert headers[":status"] == "200"
    assert headers["content-type"].startswith("application/grpc")
    assert headers["grpc-status"] == str(Status.UNIMPLEMENTED.value)
    assert headers["grpc-message"] == f"unknown method {path}"
    assert trailers == {}
    assert "Traceback" not in procs.log(proc)


def test_sigterm_with_a_stale_socket_dir_entry_still_cleans_up(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "w.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(sock))
    dead.close()
    proc = start_provider(procs, sock, ids, "--ephemeral")
    wait_for(lambda: stat.S_ISSOCK(os.lstat(sock).st_mode), what="socket")
    assert procs.stop(proc, signal.SIGTERM) == 0
    assert not sock.exists()


async def test_a_request_that_never_completes_is_cut_off(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provider_server, "REQUEST_TIMEOUT", 0.5)
    path = sockdir / "w.sock"
    web = Identity("web", SpiffeId.from_path(TD, "/web"))
    provider = WorkloadApiProvider(LocalCA.ephemeral(TD), [web])
    await provider.start(listen_unix(str(path)))

    def call() -> tuple[str | None, str | None]:
        with RawH2(str(path)) as client:
            # Two bytes of a length prefix, then silence (the stream stays open).
            response = client.call(JWT, [b"\0\0"], metadata=HEADER, end=False)
        return response.grpc_status, response.grpc_message

    try:
        status, message = await asyncio.to_thread(call)
    finally:
        await provider.close()
    assert (status, message) == (
        str(Status.DEADLINE_EXCEEDED.value),
        "request message not received within 0.5s",
    )


# ---------------------------------------------------------------------------
# Issue 7, hole 8: connections held open forever


async def _good_client_served(path: Path) -> None:
    channel = Channel(path=str(path))
    try:
        ok = await SpiffeWorkloadAPIStub(channel).FetchJWTSVID(
            pb.JWTSVIDRequest(audience=["a"]), metadata=HEADER
        )
        assert len(ok.svids) == 1
    finally:
        channel.close()


async def test_connections_stuck_in_the_preface_are_closed(sockdir: Path) -> None:
    """200 clients that never finish the HTTP/2 preface are closed (they stayed open forever)."""
    path = sockdir / "w.sock"
    web = Identity("web", SpiffeId.from_path(TD, "/web"))
    provider = WorkloadApiProvider(LocalCA.ephemeral(TD), [web], handshake_timeout=0.5)
    with captured_log("sds.provider", logging.LogRecord.getMessage) as lines:
        await provider.start(listen_unix(str(path)))
        try:
            baseline = fd_count()
            await stall_in_preface(str(path))
            await eventually(lambda: fd_count() <= baseline, what="fds back to baseline")
            await _good_client_served(path)
        finally:
            await provider.close()
    closed = [line for line in lines if "workload.connection_closed" in line]
    # Rate-limited: a few lines for 200 connections, each naming the reason.
    assert closed and len(closed) <= 10, lines
    assert all("reason=handshake_timeout" in line for line in closed), closed


async def test_idle_connection_without_streams_is_closed_but_a_stream_holds_it(
    sockdir: Path,
) -> None:
    path = sockdir / "w.sock"
    web = Identity("web", SpiffeId.from_path(TD, "/web"))
    provider = WorkloadApiProvider(
        LocalCA.ephemeral(TD), [web], handshake_timeout=0.5, idle_timeout=0.4
    )
    await provider.start(listen_unix(str(path)))
    try:
        client = await RawClient.connect(str(path))
        request = grpc_frame(pb.JWTSVIDRequest(audience=["a"]).SerializeToString())
        reply = await client.call(JWT, request, metadata=HEADER)
        assert reply.status == "0"
        await asyncio.wait_for(client.closed.wait(), 20)  # idle after its call: closed
        await client.close()
        # A connection with a long-lived stream (how the bridge watches its SVIDs) is not idle.
        channel = Channel(path=str(path))
        try:
            stub = SpiffeWorkloadAPIStub(channel)
            async with stub.FetchX509SVID.open(metadata=HEADER) as stream:
                await stream.send_message(pb.X509SVIDRequest(), end=True)
                assert len((await stream.recv_message()).svids) == 1
                await asyncio.sleep(1.5)
                provider.reload([web, Identity("db", SpiffeId.from_path(TD, "/db"))], [])
                assert len((await stream.recv_message()).svids) == 2
                await stream.cancel()
        finally:
            channel.close()
    finally:
        await provider.close()
