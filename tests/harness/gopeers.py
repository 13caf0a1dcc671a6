"""Running the go-spiffe peer program (``tests/gopeers``) and reading the JSON lines it prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.harness.procs import Processes
from tests.harness.stack import Stack, identities_yaml

TD = "spiffe://example.org"

WEB, CLIENT_A, CLIENT_B, BACKEND = (f"{TD}/{n}" for n in ("web", "client-a", "client-b", "backend"))

# The identities the bridge's provider issues for the Go-peer tests (``default`` = web).
IDENTITIES = identities_yaml(("web", "client-a", "client-b", "backend"))


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def run_go(
    procs: Processes, argv: list[str], name: str, timeout: float = 120
) -> list[dict[str, Any]]:
    """Run a Go peer to completion; its JSON lines (exit 0 required)."""
    proc = procs.start(argv, name)
    assert proc.wait(timeout) == 0, procs.log(proc)[-3000:]
    return json_lines(procs.log(proc))


def go_client(
    procs: Processes, gopeers: Path, stack: Stack, port: int, *, hint: str, server_id: str
) -> dict[str, Any]:
    argv = [str(gopeers), "client", "-addr", f"unix://{stack.workload_socket}", "-hint", hint]
    argv += ["-server-id", server_id, "-url", f"https://127.0.0.1:{port}/hello"]
    (line,) = run_go(procs, argv, f"gopeers-client-{hint}", timeout=60)
    return line
