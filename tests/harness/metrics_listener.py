"""The bridge's scrape listener (``metrics: IP:PORT``) as a test reaches it: its port, a request."""

from __future__ import annotations

from tests.harness.envoy import http_request
from tests.harness.procs import Processes, wait_for
from tests.harness.stack import Stack


def scrape_get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    return http_request(port, path, method=method)


def metrics_port(procs: Processes, stack: Stack) -> int:
    def from_log() -> str | None:
        for line in procs.log(stack.bridge).splitlines():
            if "metrics.listening" in line:
                return line.rsplit(":", 1)[1]
        return None

    return int(wait_for(from_log, 15, "metrics port in the log"))
