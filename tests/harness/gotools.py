"""Go programs the tests run (promtool, helm, spire-server, ...), built once and cached.

:func:`go_tool` builds ``MODULE/PROGRAM@VERSION`` the way the developers'
guide says: in a throwaway module, ``go get -tool`` then ``go install``, into
``${XDG_CACHE_HOME:-$HOME/.cache}/sds-tests/bin`` outside the checkout, so
fresh clones and CI reuse it. Concurrent test processes share one build (a
file lock); a finished binary is published by an atomic rename, so a reader
never sees half a file. Without ``go`` the calling test is skipped and says
why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.harness.locks import locked

__all__ = ["HELM", "PROMTOOL", "cache_dir", "go_tool", "tool_bin_dir"]

# (module, program, version) of the Go-built tools the suite runs.
HELM = ("helm.sh/helm/v3", "cmd/helm", "v3.22.0")
PROMTOOL = ("github.com/prometheus/prometheus", "cmd/promtool", "v0.316.0")

#: A first build of a big program (SPIRE, helm, promtool) on 2 busy cores.
BUILD_TIMEOUT = 1800.0


def cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-$HOME/.cache}/sds-tests``: tool caches shared by every checkout."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sds-tests"


def tool_bin_dir() -> Path:
    """Where built Go programs live: ``<cache>/bin/<program>-<version>``."""
    return cache_dir() / "bin"


def go_tool(module: str, program: str, version: str) -> Path:
    """The binary of ``module/program`` at ``version`` (e.g. ``cmd/promtool``), built if missing.

    ``program`` is the package path inside ``module``; the binary is named
    after its last element. Skips the calling test when Go is not installed;
    fails it (with go's output) when the build fails.
    """
    name = program.rstrip("/").rsplit("/", 1)[-1]
    target = tool_bin_dir() / f"{name}-{version}"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    go = shutil.which("go")
    if go is None:
        pytest.skip(f"{name} {version} is built from Go sources and `go` is not installed")
    package = f"{module}/{program}"
    with locked(tool_bin_dir() / f".{name}-{version}.lock"):
        if target.is_file():
            return target  # another process built it while we waited
        with tempfile.TemporaryDirectory(prefix=f"gotool-{name}-") as scratch:
            work = Path(scratch)
            env = {**os.environ, "GOFLAGS": "-mod=mod", "GOBIN": str(work / "bin")}
            steps = [
                [go, "mod", "init", "sds-tests-tools"],
                [go, "get", "-tool", f"{package}@{version}"],
                [go, "install", package],
            ]
            started = time.monotonic()
            for argv in steps:
                result = subprocess.run(
                    argv,
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=BUILD_TIMEOUT,
                    check=False,
                )
                if result.returncode != 0:
                    output = (result.stdout + result.stderr)[-3000:]
                    pytest.fail(f"building {package}@{version}: {' '.join(argv[1:])}:\n{output}")
            built = work / "bin" / name
            partial = target.with_name(f".{target.name}.partial")
            shutil.copy2(built, partial)
            os.replace(partial, target)
            (tool_bin_dir() / f"{name}-{version}.build-seconds").write_text(
                f"{time.monotonic() - started:.1f}\n"
            )
    return target
