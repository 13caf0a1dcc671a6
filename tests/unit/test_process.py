"""sds._util.process: pidfds name one process; exit is seen; reuse is refused."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from sds._util import process as procmod
from sds._util.grpcedge import GuardedServer
from sds._util.peercred import PeerCredentials
from sds._util.process import Process, peer_process
from sds.errors import NotEntitled, ProcessExited


def _stream_over(sock: socket.socket) -> object:
    transport = SimpleNamespace(get_extra_info=lambda name: sock if name == "socket" else None)
    return SimpleNamespace(peer=SimpleNamespace(_transport=transport))


def test_own_process_is_live_with_its_credentials() -> None:
    with Process.of_pid(os.getpid()) as proc:
        assert not proc.exited()
        assert proc.credentials() == PeerCredentials(os.getpid(), os.geteuid(), os.getegid())
        assert proc.key == (os.getpid(), proc.start_ticks)
        assert proc.start_ticks > 0


def test_exited_child_is_seen_through_the_pidfd() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # exit only once the parent holds the pidfd
        os._exit(0)
    os.close(r)
    proc = Process.of_pid(pid)
    try:
        assert not proc.exited()
        os.close(w)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # a zombie now, not yet reaped
        assert proc.exited()
        with pytest.raises(ProcessExited, match=rf"^process {pid} has exited$"):
            proc.credentials()
    finally:
        os.waitpid(pid, 0)
        proc.close()
    assert proc.exited()  # closed counts as exited


def test_unknown_pid_is_process_exited_which_is_not_entitled() -> None:
    with pytest.raises(ProcessExited, match=r"^process 0 is not a valid pid$"):
        Process.of_pid(0)
    assert issubclass(ProcessExited, NotEntitled)


def test_peer_process_uses_the_kernel_pidfd() -> None:
    a, b = socket.socketpair()
    try:
        creds = PeerCredentials(os.getpid(), os.geteuid(), os.getegid())
        with peer_process(_stream_over(a), creds) as proc:
            assert proc.pid == os.getpid()
            assert not proc.exited()
    finally:
        a.close()
        b.close()


def test_fallback_refuses_a_process_newer_than_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No SO_PEERPIDFD (a TCP-less fake stream): the pid is opened and its start time checked.
    stream = SimpleNamespace(peer=SimpleNamespace(_transport=None))
    creds = PeerCredentials(os.getpid(), 0, 0)
    with Process.of_pid(os.getpid()) as me:
        started = me.start_ticks
    with peer_process(stream, creds, accepted_ticks=started) as proc:
        assert proc.pid == os.getpid()
    with pytest.raises(
        ProcessExited,
        match=rf"^process {os.getpid()} has exited \(its pid now names a newer process\)$",
    ):
        peer_process(stream, creds, accepted_ticks=started - 1)
    assert procmod.boot_ticks() >= started


def _stream_with(sock: object, protocol: object = None) -> object:
    transport = SimpleNamespace(
        get_extra_info=lambda name: sock if name == "socket" else None,
        get_protocol=lambda: protocol,
    )
    return SimpleNamespace(peer=SimpleNamespace(_transport=transport))


def _unix_socket_refusing(code: int) -> object:
    def getsockopt(level: int, option: int) -> int:
        assert (level, option) == (socket.SOL_SOCKET, procmod.SO_PEERPIDFD)
        raise OSError(code, os.strerror(code))

    return SimpleNamespace(family=socket.AF_UNIX, getsockopt=getsockopt)


def test_fallback_compares_with_when_the_server_accepted_the_connection() -> None:
    # A kernel without SO_PEERPIDFD: the check needs the accept time, which the server's
    # protocol records; a pid whose process started after it was reused.
    creds = PeerCredentials(os.getpid(), 0, 0)
    old_kernel = _unix_socket_refusing(errno.ENOPROTOOPT)
    with Process.of_pid(os.getpid()) as me:
        started = me.start_ticks
    accepted_before = _stream_with(old_kernel, SimpleNamespace(accepted_ticks=started - 1))
    with pytest.raises(
        ProcessExited,
        match=rf"^process {os.getpid()} has exited \(its pid now names a newer process\)$",
    ):
        peer_process(accepted_before, creds)
    accepted_after = _stream_with(old_kernel, SimpleNamespace(accepted_ticks=started))
    with peer_process(accepted_after, creds) as proc:
        assert proc.pid == os.getpid()
    # No recorded accept time: now, as before.
    with peer_process(_stream_with(old_kernel, object()), creds) as proc:
        assert proc.pid == os.getpid()


def test_a_kernel_with_no_pidfd_for_the_peer_means_it_is_gone() -> None:
    # Linux 6.5-6.15 answer EINVAL for a peer already reaped: its pid is never opened, even
    # though (here) it names a live process.
    creds = PeerCredentials(os.getpid(), 0, 0)
    stream = _stream_with(_unix_socket_refusing(errno.EINVAL))
    with pytest.raises(
        ProcessExited,
        match=rf"^process {os.getpid()} has exited \(the kernel has no pidfd for it: "
        r"\[Errno 22\] Invalid argument\)$",
    ):
        peer_process(stream, creds)


def test_guarded_server_records_when_it_accepted_each_connection(tmp_path: Path) -> None:
    async def main() -> tuple[int, int | None, int]:
        server = GuardedServer([])
        path = tmp_path / "s.sock"
        await server.start(path=str(path))
        try:
            before = procmod.boot_ticks()
            _, writer = await asyncio.open_unix_connection(str(path))
            for _ in range(100):
                if server.open_connections():
                    break
                await asyncio.sleep(0.01)
            (protocol,) = list(server._protocols)
            accepted = protocol.accepted_ticks
            writer.close()
            return before, accepted, procmod.boot_ticks()
        finally:
            server.close()
            await server.wait_closed()

    before, accepted, after = asyncio.run(main())
    assert accepted is not None and before <= accepted <= after
