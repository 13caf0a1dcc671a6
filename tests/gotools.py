"""Go programs the tests run as real peers (SPIRE, Helm, promtool), built once by module name.

A program that is not a library is built the way its module publishes it:
inside a throwaway Go module, ``go get -tool MODULE/cmd/PROG@VERSION`` pins
the version (with the module's own ``go.sum``), then ``GOBIN=<cache>/bin go
install MODULE/cmd/PROG`` builds it. The binaries land in
``${XDG_CACHE_HOME:-~/.cache}/sds-tests/go/<program>-<version>/bin``, outside
the checkout, so fresh clones and CI reuse them; the Go module and build
caches (``~/go/pkg/mod``, ``~/.cache/go-build``) make later builds of the same
module fast. A first build of SPIRE takes 10-20 minutes on 2 cores.

Builds run under an exclusive lock file per program and version, so parallel
test processes build once; a ``.built`` marker written last makes a
half-finished build count as absent. Without ``go`` on ``PATH``,
:func:`go_tool_or_skip` skips the calling test with the reason.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

__all__ = ["BUILD_SECONDS", "CACHE_DIR", "GoToolError", "go_tool", "go_tool_or_skip"]

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sds-tests" / "go"
# Seconds each program took to build in this process (absent when it came from the cache).
BUILD_SECONDS: dict[str, float] = {}

_MODULE_RE = re.compile(r"[a-z0-9.\-]+(/[A-Za-z0-9._~\-]+)+")
_VERSION_RE = re.compile(r"v\d+\.\d+\.\d+([\-+][0-9A-Za-z.\-]+)?")
_BUILD_TIMEOUT = 3600.0


class GoToolError(Exception):
    """A Go program could not be built (bad module or version, or ``go`` failed)."""


def go_tool(
    package: str,
    version: str,
    *,
    programs: Sequence[str] = (),
    timeout: float = _BUILD_TIMEOUT,
    on_build: Callable[[str], None] | None = None,
) -> Path:
    """The path of the binary built from ``package`` (``MODULE/cmd/PROG``) at ``version``.

    ``programs`` names sibling packages (full paths, same module) built into
    the same cache directory in the same step, e.g. ``spire-agent`` next to
    ``spire-server``; their binaries sit next to the returned one.
    ``on_build`` is called with a one-line notice when a build starts. Raises
    GoToolError when the names are malformed, ``go`` is missing or fails.
    """
    if not _MODULE_RE.fullmatch(package):
        raise GoToolError(f"Go package {package!r} is not of the form host/path/cmd/prog")
    if not _VERSION_RE.fullmatch(version):
        raise GoToolError(f"Go module version {version!r} is not of the form vX.Y.Z")
    go = shutil.which("go")
    if go is None:
        raise GoToolError("go is not on PATH (install Go >= 1.24 to build SPIRE, Helm, promtool)")
    program = package.rsplit("/", 1)[1]
    target = CACHE_DIR / f"{program}-{version}"
    bindir = target / "bin"
    marker = target / ".built"
    wanted = [package, *programs]
    binaries = [bindir / p.rsplit("/", 1)[1] for p in wanted]

    def built() -> bool:
        return marker.is_file() and all(b.is_file() for b in binaries)

    if built():
        return binaries[0]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / f"{program}-{version}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if built():
            return binaries[0]
        shutil.rmtree(target, ignore_errors=True)
        bindir.mkdir(parents=True)
        if on_build is not None:
            on_build(f"building {' '.join(wanted)} @ {version} into {bindir} (once) ...")
        started = time.monotonic()
        env = {**os.environ, "GOFLAGS": "-mod=mod", "GOBIN": str(bindir)}
        with tempfile.TemporaryDirectory(prefix="gotool-") as scratch:
            steps = [[go, "mod", "init", "sds-tests-gotool"]]
            steps += [[go, "get", "-tool", f"{p}@{version}"] for p in wanted]
            steps.append([go, "install", *wanted])
            for argv in steps:
                result = subprocess.run(
                    argv,
                    cwd=scratch,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    check=False,
                )
                if result.returncode != 0:
                    shutil.rmtree(target, ignore_errors=True)
                    raise GoToolError(
                        f"{' '.join(argv[1:])} failed: {result.stderr.strip()[-2000:]}"
                    )
        missing = [str(b) for b in binaries if not b.is_file()]
        if missing:
            raise GoToolError(f"go install produced no binary at {', '.join(missing)}")
        elapsed = time.monotonic() - started
        BUILD_SECONDS[program] = elapsed
        marker.write_text(f"{' '.join(wanted)} @ {version} built in {elapsed:.0f}s\n")
        return binaries[0]


def go_tool_or_skip(package: str, version: str, *, programs: Sequence[str] = ()) -> Path:
    """:func:`go_tool`, skipping the calling test (with the reason) when ``go`` is missing."""
    if shutil.which("go") is None:
        pytest.skip(f"go is not on PATH: cannot build {package}@{version}")
    return go_tool(package, version, programs=programs)
