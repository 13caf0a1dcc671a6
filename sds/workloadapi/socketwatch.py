"""Tells when a Unix socket path is created or replaced (inotify on Linux, else a stat poll).

The Watcher uses it while disconnected, so a restarted Workload API server is
reconnected to at once instead of after the backoff delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import struct
import sys

__all__ = ["SocketWatch", "inode"]

#: Stat-poll interval when inotify is not available (only while disconnected).
_POLL_INTERVAL = 0.2

_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_EVENT = struct.Struct("iIII")


def inode(path: str) -> tuple[int, int, int] | None:
    """Identity of the file at ``path``: device, inode and change time (tmpfs reuses inode
    numbers at once, so a recreated socket can carry its predecessor's), or None."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return (info.st_dev, info.st_ino, info.st_ctime_ns)


def _inotify_directory(directory: str) -> int:
    """An inotify fd watching ``directory`` for created and moved-in entries; raise OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1 failed")
    mask = _IN_CREATE | _IN_MOVED_TO | _IN_DELETE_SELF | _IN_MOVE_SELF
    if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
        errno = ctypes.get_errno()
        os.close(fd)
        raise OSError(errno, f"inotify_add_watch {directory} failed")
    return fd


class SocketWatch:
    """Tells when a Unix socket path is created or replaced, so a reconnect need not wait
    out its backoff.

    Linux: inotify on the socket's directory (no polling); elsewhere, or while the
    directory itself is missing, a stat poll every 0.2 s. It exists only while the
    watcher is disconnected. If the path already holds another inode than
    ``known`` (the socket we were last connected to, if any), that counts as
    having appeared.
    """

    def __init__(self, path: str, known: tuple[int, int, int] | None) -> None:
        self._path = path
        self._directory, self._name = os.path.split(path)
        self._appeared = asyncio.Event()
        self._fd = -1
        self._poller: asyncio.Task[None] | None = None
        current = inode(path)
        self._seen = current  # what the stat poll compares against
        self._start()
        if known is not None and current is not None and current != known:
            self._appeared.set()  # replaced between the disconnect and this watch

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if sys.platform.startswith("linux"):
            try:
                self._fd = _inotify_directory(self._directory)
            except (OSError, AttributeError):
                self._fd = -1
            else:
                loop.add_reader(self._fd, self._readable)
                return
        self._poller = loop.create_task(self._poll(), name="socket-poll")

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        offset = 0
        gone = not data
        while offset + _EVENT.size <= len(data):
            _, mask, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & (_IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED):
                gone = True
            elif mask & _IN_Q_OVERFLOW or os.fsdecode(name) == self._name:
                self._appeared.set()  # an overflow may have hidden ours: try once more
        if gone:  # the directory went away: fall back to polling until it is back
            self._close_fd()
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="socket-poll")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(_POLL_INTERVAL)
            current = inode(self._path)
            if current != self._seen:
                self._seen = current
                if current is not None:
                    self._appeared.set()

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait up to ``timeout`` s; True if the socket appeared (the flag is then cleared)."""
        try:
            async with asyncio.timeout(timeout):
                await self._appeared.wait()
        except TimeoutError:
            return False
        self._appeared.clear()
        return True

    def _close_fd(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        """Stop watching (on connect, or when the watcher stops)."""
        self._close_fd()
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
