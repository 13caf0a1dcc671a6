"""sds._util.process: pidfds name one process; exit is seen; reuse is refused."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest

from sds._util import process as procmod
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
    assert procmod._boot_ticks() >= started
