"""Caller identity from the kernel (SO_PEERCRED), and the local paths callers reach us by.

Besides reading peer credentials, this module owns the two filesystem rules
both servers (the bridge and the embedded provider) share:

* :func:`open_private_dir` opens (creating it 0700 if missing) a directory
  that only we may use, for keys: it must be ours, mode ``0700`` or
  stricter, and not a symlink. Files in it are then read and written
  relative to the returned directory fd (:func:`read_private_file`,
  :func:`write_private_file`), so nobody can redirect them.
* :func:`listen_unix` binds a listening Unix socket in a directory that must
  be owned by us or root and not writable by anyone else unless sticky; the
  check and the bind use one directory fd, so the directory cannot be
  swapped in between. A live server at the path is refused, a stale socket
  replaced, and :meth:`UnixListener.remove` unlinks the socket only while it
  is still the inode we bound.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Any

from sds._util.files import read_regular_file
from sds.errors import SocketInUse, UnsafePath

__all__ = [
    "DEFAULT_BACKLOG",
    "MAX_PRIVATE_FILE",
    "PeerCredentials",
    "UnixListener",
    "bind_unix_socket",
    "check_socket_dir",
    "listen_unix",
    "open_private_dir",
    "peer_credentials",
    "read_private_file",
    "write_private_file",
]

# Sized for a thousand Envoys reconnecting at once (the kernel caps it at somaxconn).
DEFAULT_BACKLOG = 1024
# Key and certificate files we keep are a few kB; refuse to read anything larger.
MAX_PRIVATE_FILE = 1 << 20
_PROBE_TIMEOUT = 1.0

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


def _describe_mode(mode: int) -> str:
    return f"{stat.S_IMODE(mode):o}"


def open_private_dir(path: str, *, create: bool = True) -> int:
    """Open ``path`` as a directory only we can use and return its fd (O_DIRECTORY, close-on-exec).

    A missing directory is created with mode 0700 (missing parents get the
    umask's default) when ``create`` is true. An existing one must be a real
    directory (not a symlink), owned by our effective uid, with no group or
    other permission bits; otherwise UnsafePath with one line naming it.
    """
    if "\0" in path:
        raise UnsafePath(f"{path!r}: a directory path cannot contain NUL")
    if create:
        parent = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(parent, exist_ok=True)
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise UnsafePath(f"{path}: cannot create directory: {exc.strerror or exc}") from exc
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            raise UnsafePath(f"{path}: is a symbolic link; give the directory itself") from exc
        raise UnsafePath(f"{path}: cannot open directory: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        me = os.geteuid()
        if info.st_uid != me:
            raise UnsafePath(
                f"{path}: owned by uid {info.st_uid}, not by us (uid {me}); "
                "use a directory we own with mode 0700"
            )
        if info.st_mode & 0o077:
            raise UnsafePath(
                f"{path}: mode {_describe_mode(info.st_mode)} lets group or others in; want 0700"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private_file(dir_fd: int, name: str, *, where: str, secret: bool = True) -> bytes | None:
    """Read ``name`` in the directory ``dir_fd`` without following symlinks; None if absent.

    The file must be a regular file owned by us, at most MAX_PRIVATE_FILE
    bytes, and (when ``secret``) with no group or other permission bits.
    ``where`` names the directory in errors (UnsafePath).
    """

    def check(info: os.stat_result) -> str | None:
        if info.st_uid != os.geteuid():
            return f"owned by uid {info.st_uid}, not by us"
        if secret and info.st_mode & 0o077:
            return f"private key is mode {_describe_mode(info.st_mode)}; want 600"
        return None

    try:
        return read_regular_file(
            name,
            MAX_PRIVATE_FILE,
            lambda why: UnsafePath(f"{where}/{name}: {why}"),
            dir_fd=dir_fd,
            follow_symlinks=False,
            check=check,
        )
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"{where}/{name}: is a symbolic link; refusing it") from exc
        raise UnsafePath(f"{where}/{name}: cannot read: {exc.strerror or exc}") from exc


def write_private_file(dir_fd: int, name: str, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``name`` in ``dir_fd`` atomically: a new temp file (O_EXCL, O_NOFOLLOW), fsync, rename.

    The temporary ``name.tmp`` is created exclusively with ``mode`` from the
    start, so nobody else's file or symlink is ever written through; a stale
    one of ours (left by a crash) is unlinked first. The directory is
    fsynced after the rename so the new name survives a power cut.
    """
    tmp = f"{name}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)  # unlink never follows a symlink
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def check_socket_dir(dir_fd: int, where: str) -> None:
    """Refuse a socket directory another uid could swap files in (UnsafePath, one line).

    The directory behind ``dir_fd`` must be owned by us or root, and not
    writable by group or others unless the sticky bit is set (as on /tmp),
    where only a file's owner may rename or remove it.
    """
    info = os.fstat(dir_fd)
    me = os.geteuid()
    if info.st_uid not in (me, 0):
        raise UnsafePath(
            f"socket directory {where}: owned by uid {info.st_uid}, not by us (uid {me}) "
            "or root; use a directory we own"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        raise UnsafePath(
            f"socket directory {where}: mode {_describe_mode(info.st_mode)} lets others "
            "replace the socket; remove group/other write or set the sticky bit"
        )


@dataclass(slots=True)
class UnixListener:
    """A listening Unix socket and the filesystem inode it was bound to."""

    sock: socket.socket
    path: str
    dev: int
    ino: int

    def still_ours(self) -> bool:
        """Whether ``path`` is still the socket file we bound (not replaced or removed)."""
        try:
            info = os.lstat(self.path)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == (self.dev, self.ino)

    def remove(self) -> bool:
        """Unlink the socket file if it is still ours; True when it was removed.

        A file that another process bound at the same path since is left alone.
        """
        if not self.still_ours():
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
            return True
        return False


def _in_dir(dir_fd: int, name: str) -> str:
    """A path for ``name`` in the directory ``dir_fd`` that needs no lookup of its parents."""
    return f"/proc/self/fd/{dir_fd}/{name}"


def _answers(address: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT)
    try:
        probe.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # a backlog that is full: someone is listening
    except OSError:
        return False
    finally:
        probe.close()
    return True


def listen_unix(path: str, mode: int = 0o600, *, backlog: int = DEFAULT_BACKLOG) -> UnixListener:
    """Bind and listen on a Unix socket at ``path`` that is never more open than ``mode``.

    The parent directory is opened once and checked (:func:`check_socket_dir`);
    the probe, the removal of a stale socket and the bind all go through that
    directory fd, so no swapped directory is ever used. If something accepts
    connections at ``path``, SocketInUse names it; a socket nobody answers on
    is replaced; any other file there is refused. The umask is tightened
    around ``bind(2)``, so the socket is never wider than ``mode``, even for
    a moment. Other failures raise UnsafePath (missing directory, ...).
    """
    directory, name = os.path.split(os.path.abspath(path))
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    if "\0" in path:
        raise UnsafePath(f"{path!r}: a socket path cannot contain NUL")
    try:
        dir_fd = os.open(directory, flags)
    except OSError as exc:
        raise UnsafePath(
            f"socket directory {directory}: cannot open: {exc.strerror or exc}"
        ) from exc
    try:
        check_socket_dir(dir_fd, directory)
        address = _in_dir(dir_fd, name)
        if len(address.encode()) > 107:
            raise UnsafePath(f"{path}: socket file name too long")
        try:
            existing = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            existing = None
        if existing is not None:
            if not stat.S_ISSOCK(existing.st_mode):
                raise UnsafePath(f"{path}: exists and is not a socket")
            if _answers(address):
                raise SocketInUse(
                    f"{path}: another server is already listening there; "
                    "stop it or choose another --socket path"
                )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise SocketInUse(f"{path}: another server bound it just now") from exc
            raise UnsafePath(f"{path}: cannot bind: {exc.strerror or exc}") from exc
        finally:
            os.umask(old)
        try:
            os.chmod(name, mode, dir_fd=dir_fd)
            info = os.lstat(name, dir_fd=dir_fd)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return UnixListener(sock, os.path.join(directory, name), info.st_dev, info.st_ino)
    finally:
        os.close(dir_fd)


def bind_unix_socket(path: str, mode: int = 0o600) -> socket.socket:
    """:func:`listen_unix` for callers that only need the socket (same checks and errors)."""
    return listen_unix(path, mode).sock
