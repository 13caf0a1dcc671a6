"""A local process held by a pidfd, so its pid cannot be mistaken for a later process's.

Per-caller attestation hands a pid to an attestor (SPIRE's Delegated Identity
API, or the embedded provider's) and serves what comes back to the process
that pid named. A bare pid is not an identity: once the process exits, the
kernel may give the number to another one. SPIRE's API makes this the
delegate's duty ("ensure that the PID is valid and not recycled, from
initiation of this call until the termination of the response stream").

:class:`Process` discharges it with a pidfd (Linux 5.3+), a file descriptor
that always refers to the one process it was opened for and becomes readable
when that process exits:

* :func:`peer_process` takes the pidfd of a Unix socket's peer from the
  kernel (``SO_PEERPIDFD``, Linux 6.5+): the process that called
  ``connect(2)``, with no window for reuse. On older kernels it falls back to
  ``pidfd_open(SO_PEERCRED pid)`` and refuses the peer if that process
  started after the connection was accepted (a reused pid): the server's
  protocol records when it accepted the connection (``accepted_ticks``, set
  by :class:`sds._util.grpcedge.GuardedServer`).
* :meth:`Process.exited` polls the pidfd; :meth:`Process.fileno` lets the
  event loop watch it (``loop.add_reader``), so a subscription made for the
  process ends the moment it exits.
* :meth:`Process.credentials` reads ``/proc/<pid>/status`` and checks the
  pidfd is still live afterwards, so what it returns belongs to this
  process, not to a successor with the same pid.

``key`` (pid and start time in clock ticks since boot) names the process
uniquely for the life of the machine, so subscriptions can be shared between
connections of one process and never across two.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from sds._util.peercred import PeerCredentials
from sds.errors import ProcessExited

__all__ = ["Process", "boot_ticks", "peer_process"]

#: ``SO_PEERPIDFD`` from <asm-generic/socket.h> (Linux 6.5); Python 3.11 lacks the name.
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
#: How a kernel without ``SO_PEERPIDFD`` refuses the option (sk_getsockopt's default).
_NO_PEERPIDFD = frozenset({errno.ENOPROTOOPT, errno.EOPNOTSUPP})
_PROC = "/proc"


def boot_ticks() -> int:
    """Now, in the clock ticks since boot that ``/proc/<pid>/stat`` counts start times in."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def _start_ticks(pid: int) -> int:
    """Field 22 of ``/proc/<pid>/stat``: when the process started, in ticks since boot."""
    try:
        with open(f"{_PROC}/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessExited(f"process {pid} has exited") from exc
    # The command name (field 2) is in parentheses and may itself contain ") ".
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[19])


@dataclass(eq=False)
class Process:
    """One live (or exited) process, held by a pidfd that only ever refers to it."""

    pid: int
    fd: int
    start_ticks: int
    _closed: bool = field(default=False, repr=False)

    @property
    def key(self) -> tuple[int, int]:
        """``(pid, start ticks)``: unique to this process for the life of the machine."""
        return (self.pid, self.start_ticks)

    @classmethod
    def of_pid(cls, pid: int) -> Process:
        """Open the process ``pid`` names now; :class:`ProcessExited` if there is none.

        Only as good as the caller's knowledge that ``pid`` still names the process
        it means; prefer :func:`peer_process` for a connected peer.
        """
        if pid <= 0:
            raise ProcessExited(f"process {pid} is not a valid pid")
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError as exc:
            raise ProcessExited(f"process {pid} has exited") from exc
        return cls._opened(pid, fd)

    @classmethod
    def _opened(cls, pid: int, fd: int) -> Process:
        try:
            proc = cls(pid, fd, _start_ticks(pid))
            if proc.exited():
                raise ProcessExited(f"process {pid} has exited")
        except BaseException:
            os.close(fd)
            raise
        return proc

    def fileno(self) -> int:
        """The pidfd: readable once the process has exited."""
        return self.fd

    def exited(self) -> bool:
        """Whether the process has exited (also while it is an unreaped zombie)."""
        if self._closed:
            return True
        readable, _, _ = select.select([self.fd], [], [], 0)
        return bool(readable)

    def credentials(self) -> PeerCredentials:
        """Its effective uid and gid now, from ``/proc/<pid>/status``; :class:`ProcessExited`
        if it has exited (checked after reading, so they are never a successor's)."""
        try:
            with open(f"{_PROC}/{self.pid}/status", "rb") as f:
                status = f.read()
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise ProcessExited(f"process {self.pid} has exited") from exc
        ids: dict[bytes, int] = {}
        for line in status.splitlines():
            name, _, value = line.partition(b":")
            if name in (b"Uid", b"Gid"):
                ids[name] = int(value.split()[1])  # real, effective, saved, filesystem
        if self.exited() or len(ids) != 2:
            raise ProcessExited(f"process {self.pid} has exited")
        return PeerCredentials(self.pid, ids[b"Uid"], ids[b"Gid"])

    def close(self) -> None:
        """Release the pidfd (idempotent)."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _accepted_ticks(stream: Any) -> int:
    """When the stream's connection was accepted (its protocol's ``accepted_ticks``), else now."""
    transport = getattr(stream.peer, "_transport", None)
    get_protocol = getattr(transport, "get_protocol", None)
    ticks = getattr(get_protocol(), "accepted_ticks", None) if get_protocol else None
    return ticks if isinstance(ticks, int) else boot_ticks()


def _peer_socket(stream: Any) -> socket.socket | None:
    transport = getattr(stream.peer, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    return sock  # type: ignore[no-any-return]


def peer_process(stream: Any, creds: PeerCredentials, accepted_ticks: int | None = None) -> Process:
    """The process at the other end of a grpclib server stream's Unix socket.

    ``creds`` are the stream's SO_PEERCRED credentials. The kernel's own pidfd
    (``SO_PEERPIDFD``) is used when it has one. A kernel that knows the option
    but gives no pidfd (Linux 6.5 to 6.15 answer so for a peer already reaped)
    means the peer is gone: its pid may name another process by now, so it is
    never opened. Only a kernel without the option falls back to opening the
    pid, refused as reused if that process started after ``accepted_ticks``
    (default: when the server accepted the connection, if its protocol
    recorded that, else now). Raises :class:`ProcessExited` when the peer
    process is gone.
    """
    sock = _peer_socket(stream)
    if sock is not None:
        try:
            fd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        except OSError as exc:
            if exc.errno not in _NO_PEERPIDFD:
                raise ProcessExited(
                    f"process {creds.pid} has exited (the kernel has no pidfd for it: {exc})"
                ) from exc
        else:
            return Process._opened(creds.pid, fd)
    proc = Process.of_pid(creds.pid)
    limit = accepted_ticks if accepted_ticks is not None else _accepted_ticks(stream)
    if proc.start_ticks > limit:
        proc.close()
        raise ProcessExited(f"process {creds.pid} has exited (its pid now names a newer process)")
    return proc
