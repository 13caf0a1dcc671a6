"""Go peers for tests and benchmarks: build once into a cache outside the checkout, then start them.

Two binaries, each built under an exclusive lock into
``${XDG_CACHE_HOME:-~/.cache}/sds-tests/gopeers/`` and reused by every later
run (fresh clones and CI share the cache):

* ``gopeers`` from ``tests/gopeers`` (our module, go-spiffe pinned in its
  committed go.mod/go.sum), keyed by a hash of its sources and the Go version,
  so an edit rebuilds it;
* ``ghostunnel`` at :data:`GHOSTUNNEL_VERSION`, keyed by version and Go version.

The first build downloads modules from the Go module proxy; a cached build
costs one ``stat``. :func:`require_go` skips the calling test with a stated
reason when ``go`` is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.locks import locked

__all__ = [
    "CACHE_DIR",
    "GHOSTUNNEL_MODULE",
    "GHOSTUNNEL_VERSION",
    "GOPEERS_SOURCES",
    "GO_SPIFFE_VERSION",
    "GoBuildError",
    "ghostunnel_argv",
    "ghostunnel_binary",
    "go_version",
    "gopeers_binary",
    "loopback_listener",
    "require_go",
]

REPO = Path(__file__).resolve().parents[2]
GOPEERS_SOURCES = REPO / "tests" / "gopeers"
CACHE_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sds-tests" / "gopeers"
)
GHOSTUNNEL_MODULE = "github.com/ghostunnel/ghostunnel"
GHOSTUNNEL_VERSION = "v1.8.4"
GO_SPIFFE_VERSION = "v2.9.0"
BUILD_TIMEOUT = 1800.0


class GoBuildError(Exception):
    """A Go peer could not be built (the message carries the tail of the build's output)."""


def go_version() -> str | None:
    """``go env GOVERSION`` (e.g. ``go1.26.8``), or None when ``go`` is not on PATH."""
    go = shutil.which("go")
    if go is None:
        return None
    result = subprocess.run(
        [go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60, check=False
    )
    return result.stdout.strip() or None


def require_go() -> str:
    """The Go version; skips the calling test when ``go`` is missing."""
    version = go_version()
    if version is None:
        pytest.skip("go is not installed: the Go peers (go-spiffe, Ghostunnel) need it to build")
    return version


def _run(argv: list[str], cwd: Path, what: str) -> str:
    result = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
    )
    if result.returncode != 0:
        raise GoBuildError(f"{what} failed: {(result.stderr or result.stdout).strip()[-3000:]}")
    return result.stdout


def _cached_build(key: str, name: str, build: Callable[[Path], None]) -> Path:
    """``CACHE_DIR/key/name``, running ``build(output)`` once under a lock if it is absent.

    The binary is written to a temporary name and renamed into place, and a
    ``.built`` marker is written last, so an interrupted build counts as absent.
    """
    target_dir = CACHE_DIR / key
    binary = target_dir / name
    marker = target_dir / ".built"
    if marker.is_file() and binary.is_file():
        return binary
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with locked(CACHE_DIR / f"{key}.lock"):
        if marker.is_file() and binary.is_file():
            return binary
        target_dir.mkdir(parents=True, exist_ok=True)
        partial = target_dir / f".{name}.partial"
        partial.unlink(missing_ok=True)
        build(partial)
        partial.replace(binary)
        marker.write_text(f"{key}\n")
        return binary


def _sources_hash(go: str) -> str:
    digest = hashlib.sha256(go.encode())
    for path in sorted(GOPEERS_SOURCES.iterdir()):
        if path.is_file() and (path.suffix == ".go" or path.name in ("go.mod", "go.sum")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def gopeers_binary() -> Path:
    """The ``gopeers`` binary built from ``tests/gopeers`` (go-spiffe :data:`GO_SPIFFE_VERSION`).

    go.sum is committed, so the build verifies every module it downloads and
    needs no ``-mod=mod``. Raises GoBuildError when the build fails.
    """
    go = require_go()

    def build(output: Path) -> None:
        _run(["go", "build", "-trimpath", "-o", str(output), "."], GOPEERS_SOURCES, "go build")

    return _cached_build(f"gopeers-{_sources_hash(go)}", "gopeers", build)


def ghostunnel_binary() -> Path:
    """Ghostunnel :data:`GHOSTUNNEL_VERSION`, built from its own module and its own go.sum.

    ``go install github.com/ghostunnel/ghostunnel@v1.8.4`` is refused: the
    proxy answers 403 to the module's version list, which ``go install``
    reads for deprecation notices. So the tagged module is fetched with
    ``go mod download -json MODULE@VERSION`` (the proxy does serve the zip;
    its hash is checked against sum.golang.org) and built inside the
    extracted module directory, with the module's own go.mod and go.sum.
    That directory lists a ``vendor/`` that module zips do not carry, so the
    build needs ``-mod=mod``; it reads go.mod and never writes it.
    """
    go = require_go()

    def build(output: Path) -> None:
        info = json.loads(
            _run(
                ["go", "mod", "download", "-json", f"{GHOSTUNNEL_MODULE}@{GHOSTUNNEL_VERSION}"],
                REPO,
                "go mod download",
            )
        )
        if info.get("Error"):
            raise GoBuildError(f"go mod download: {info['Error']}")
        argv = ["go", "build", "-mod=mod", "-trimpath", "-o", str(output)]
        argv += ["-ldflags", f"-X main.version={GHOSTUNNEL_VERSION}", "."]
        _run(argv, Path(info["Dir"]), "go build ghostunnel")

    key = f"ghostunnel-{GHOSTUNNEL_VERSION}-{go}"
    return _cached_build(key, "ghostunnel", build)


def loopback_listener() -> socket.socket:
    """A listening TCP socket on 127.0.0.1 with a kernel-chosen port (to hand to a child)."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=128)
    sock.set_inheritable(True)
    return sock


def ghostunnel_argv(
    binary: Path,
    listener: socket.socket,
    *,
    workload_socket: Path,
    target_port: int,
    allow_uris: list[str],
) -> tuple[list[str], dict[str, Any]]:
    """Argv and Popen kwargs for Ghostunnel in server mode, serving on ``listener``.

    Ghostunnel prints no bound port, so it gets an already-bound socket via
    systemd socket activation (``--listen systemd:gt``): bash (dash takes no fd > 9) sets
    ``LISTEN_PID`` to its own pid, moves the socket to fd 3 and execs
    Ghostunnel, which then checks ``LISTEN_PID == getpid()``. Certificates and
    roots come from our Workload API (``--use-workload-api-addr``); callers
    are admitted by URI SAN (``--allow-uri``).
    """
    fd = listener.fileno()
    argv = [
        "/bin/bash",
        "-c",
        f'export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=gt; exec "$@" 3<&{fd}',
        "ghostunnel",
        str(binary),
        "server",
        "--listen",
        "systemd:gt",
        "--target",
        f"127.0.0.1:{target_port}",
        "--use-workload-api-addr",
        f"unix://{workload_socket}",
        "--quiet",
        "conns",
    ]
    for uri in allow_uris:
        argv += ["--allow-uri", uri]
    return argv, {"pass_fds": (fd,)}
