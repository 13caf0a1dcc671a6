"""Caller identity from the kernel (SO_PEERCRED), never from anything the client sends."""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["PeerCredentials", "bind_unix_socket", "peer_credentials"]

_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The pid, uid and gid of the process at the other end of a Unix socket."""

    pid: int
    uid: int
    gid: int


def _from_socket(sock: socket.socket) -> PeerCredentials | None:
    if sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


def peer_credentials(stream: Any) -> PeerCredentials | None:
    """The kernel's credentials for the peer of a grpclib server stream.

    Returns None when the connection is not a Unix socket (TCP has no peer
    credentials). grpclib exposes the transport through ``stream.peer``; the
    credentials are those recorded by the kernel at ``connect(2)`` time.
    """
    transport = getattr(stream.peer, "_transport", None)
    if transport is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    return _from_socket(sock)


def bind_unix_socket(path: str, mode: int = 0o600) -> socket.socket:
    """Bind a listening Unix socket at ``path`` that is never more open than ``mode``.

    A stale socket file left by a dead process is replaced; any other kind of
    file at ``path`` is refused with FileExistsError. The umask is tightened
    around ``bind(2)`` so there is no window in which the socket is wider.
    """
    if os.path.lexists(path):
        import stat  # noqa: PLC0415

        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(128)
    sock.setblocking(False)
    return sock
