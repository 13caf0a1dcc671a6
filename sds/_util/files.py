"""Reading small files that others may have written: regular files only, bounded, never blocking.

One implementation for the bridge config, the identities and federation files,
and the provider's private state files. Callers choose the error class and
wording through ``refuse``; OS errors (a missing file, a symlink refused by
``O_NOFOLLOW``, a failed read) and ``ValueError`` (a NUL in the path)
propagate for the caller to word, with :func:`os_reason`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = ["os_reason", "read_regular_file"]


def os_reason(exc: BaseException) -> str:
    """The OS's one-phrase reason (``strerror``), else the exception's text."""
    return getattr(exc, "strerror", None) or str(exc)


def read_regular_file(
    path: str | Path,
    limit: int,
    refuse: Callable[[str], Exception],
    *,
    dir_fd: int | None = None,
    follow_symlinks: bool = True,
    check: Callable[[os.stat_result], str | None] | None = None,
) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes.

    Opened non-blocking (and never as a controlling terminal), so a FIFO or
    device is refused instead of hanging. A refusal raises ``refuse(reason)``
    with reason ``not a regular file``, ``larger than LIMIT bytes`` or what
    ``check`` returned for the file's stat (``None``: accepted).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise refuse("not a regular file")
        problem = check(info) if check is not None else None
        if problem is not None:
            raise refuse(problem)
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, min(65536, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise refuse(f"larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)
