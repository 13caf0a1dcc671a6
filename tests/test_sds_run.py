"""`sds run` as a process: socket bound only after the first SVID, readiness, wait, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import Processes, wait_for
from tests.stack import Stack


def _readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sds", "wait", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_socket_appears_only_with_secrets_then_sigterm_cleans_up(
    procs: Processes, sockdir: Path
) -> None:
    stack = Stack(procs, sockdir)
    stack.write_config()
    bridge = procs.sds("run", "--config", str(stack.config_path), name="bridge")
    stack.bridge = bridge
    port = int(wait_for(stack._admin_port_from_log, 15, "admin port"))

    # No Workload API yet: no socket, not ready, and the reason says why.
    status, body = _readyz(port)
    assert (status, body) == (503, "not ready: no X.509 context from the Workload API yet\n")
    assert not stack.sds_socket.exists()
    waited = _wait("--socket", f"unix://{stack.sds_socket}", "--timeout", "0.5")
    assert waited.returncode == 1
    assert waited.stderr.strip() == "sds wait: not ready after 0.5s: socket does not exist yet"

    stack.start_provider()
    assert _wait("--socket", f"unix://{stack.sds_socket}", "--timeout", "30").returncode == 0
    assert _wait("--admin", f"127.0.0.1:{port}", "--timeout", "30").stdout.strip() == "ready"
    assert _readyz(port) == (200, "ready\n")
    assert stack.sds_socket.stat().st_mode & 0o777 == 0o600

    assert procs.stop(bridge, signal.SIGTERM) == 0
    assert not stack.sds_socket.exists()
    assert "bridge.stopping" in procs.log(bridge)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory owned by another uid")
def test_listen_directory_others_can_write_is_refused(procs: Processes, sockdir: Path) -> None:
    stack = Stack(procs, sockdir)
    shared = sockdir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    os.chown(shared, 1000, 1000)
    stack.sds_socket = shared / "sds.sock"
    stack.write_config()
    stack.start_provider()
    result = subprocess.run(
        [sys.executable, "-m", "sds", "run", "--config", str(stack.config_path), "--admin", "off"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"sds run: socket directory {shared} is writable by others and not ours; "
        "use a directory we own (mode 0700 or 0750)"
    )
    assert not stack.sds_socket.exists()
