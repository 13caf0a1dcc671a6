"""`sds demo` (the README's first command) makes every claim it prints true, and cleans up."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import wait_for


def _leftovers(workdir: Path) -> list[str]:
    """Processes whose command line mentions the demo's directory."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(workdir) in cmdline:
            found.append(cmdline)
    return found


def test_demo_once_checks_every_claim(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    workdir.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sds",
            "demo",
            "--once",
            "--workdir",
            str(workdir),
            "--rotation-ttl",
            "6s",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    claims = {line.split(":", 1)[0]: line for line in out.splitlines() if line.startswith("[")}
    assert set(claims) == {
        "[ok] allowed",
        "[ok] refused",
        "[ok] rotation",
        "[ok] jwt",
        "[ok] native client",
    }, out
    assert "The app saw caller spiffe://demo.example/client" in claims["[ok] allowed"]
    assert "presented spiffe://demo.example/server" in claims["[ok] allowed"]
    assert "the intruder's Envoy answered 503" in claims["[ok] refused"]
    rotation = re.search(
        r"(\d+) requests during the rotation, (\d+) failed", claims["[ok] rotation"]
    )
    assert rotation is not None and int(rotation.group(1)) > 0 and rotation.group(2) == "0"
    assert "a forged token: 401" in claims["[ok] jwt"]
    assert "subject spiffe://demo.example/client" in claims["[ok] jwt"]
    assert "HTTP 200 from spiffe://demo.example/server" in claims["[ok] native client"]
    assert "All 5 checks passed." in out
    assert "stopped everything it started" in out
    assert _leftovers(workdir) == []


def test_demo_runs_until_interrupted_then_tears_down(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    workdir.mkdir()
    log = tmp_path / "demo.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sds",
                "demo",
                "--workdir",
                str(workdir),
                "--rotation-ttl",
                "6s",
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: "Ctrl-C to stop." in log.read_text(), 240, "the demo to settle")
        assert _leftovers(workdir), "the topology should be running"
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    deadline = time.monotonic() + 10
    while _leftovers(workdir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _leftovers(workdir) == []
    assert "stopped everything it started" in log.read_text()
