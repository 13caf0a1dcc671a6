"""Redundant upstreams for real: two SPIRE agents on one host, one killed under traffic.

Both agents are attested to one server (each its own data dir, socket and
join token) and the bridge's identity is registered under both, so each
agent issues its own SVID for ``spiffe://example.org/web``. The bridge lists
both as ``workload_api``; Envoy gets its certificate from the bridge.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Processes, wait_for
from tests.harness.clientloop import ClientLoop
from tests.harness.envoy import Envoys, bootstrap, downstream_mtls_listener, sds_cluster
from tests.harness.spire import (
    TRUST_DOMAIN,
    SpireAgent,
    SpireServer,
    own_uid_selector,
    spire_binaries,
)
from tests.harness.stack import Stack
from tests.harness.tlsclient import HttpsClient

pytestmark = [pytest.mark.spire, pytest.mark.chaos]

WEB = f"spiffe://{TRUST_DOMAIN}/web"
GRACE = 2.0


class SerialLog:
    """Polls both agents in a thread and remembers which agent issued each serial."""

    def __init__(self, agents: dict[str, SpireAgent]) -> None:
        self.agents = agents
        self.issuer: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, agent in self.agents.items():
                try:
                    svid = agent.context(timeout=1).find(spiffe_id=WEB)
                except Exception:
                    continue
                if svid is not None:
                    self.issuer.setdefault(svid.serial, name)
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture(scope="module")
def two_agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SpireAgent, ...]]:
    server_bin, agent_bin = spire_binaries()
    procs = Processes(tmp_path_factory.mktemp("spire-failover-logs"))
    server = SpireServer(procs, server_bin).start()
    agents = (
        SpireAgent(server, agent_bin, name="agent-a").start(),
        SpireAgent(server, agent_bin, name="agent-b").start(),
    )
    for agent in agents:
        server.entry_create(agent.spiffe_id, WEB, own_uid_selector(), hint="web")
    for agent in agents:
        agent.wait_svid(WEB)
    yield agents
    for agent in agents:
        agent.close()
    server.close()
    procs.close()


def test_kill9_of_the_serving_agent_fails_over_without_a_failed_request(
    two_agents: tuple[SpireAgent, SpireAgent], procs: Processes, envoys: Envoys, sockdir: Path
) -> None:
    agent_a, agent_b = two_agents
    a_addr, b_addr = f"unix://{agent_a.socket}", f"unix://{agent_b.socket}"
    stack = Stack(procs, sockdir)
    stack.write_config(
        workload_api=[a_addr, b_addr], failover={"grace": f"{GRACE:g}s", "margin": 0.2}
    )
    stack.start_bridge()
    serials = SerialLog({"a": agent_a, "b": agent_b})
    config = bootstrap(
        "failover",
        "spire",
        [downstream_mtls_listener("in")],
        [sds_cluster("sds", stack.sds_socket)],
    )
    envoy = envoys.start(config, ready_timeout=60)
    minted = agent_a.server.mint(f"spiffe://{TRUST_DOMAIN}/client")
    loop = ClientLoop(HttpsClient(minted.ca, minted.cert, minted.key), envoy.listener_port("in"))
    loop.interval = 0.02
    loop.start()
    try:

        def serving() -> str:
            (web,) = [u for u in stack.admin("/upstreams") if WEB in u["serving"]]
            return str(web["upstream"])

        # Whichever agent answered the bridge first serves (sticky); kill that one.
        by_addr = {a_addr: ("a", agent_a), b_addr: ("b", agent_b)}
        first_addr = wait_for(serving, 20, "an upstream serving web")
        ((first, victim),) = [by_addr[first_addr]]
        (other_addr,) = [addr for addr in by_addr if addr != first_addr]
        other, _ = by_addr[other_addr]
        wait_for(lambda: loop.ok > 20, 20, "traffic")
        wait_for(
            lambda: serials.issuer.get(loop.serials[-1]) == first,
            30,
            f"Envoy presents {first}'s SVID",
        )
        killed_at = time.monotonic()
        victim.stop(signal.SIGKILL)
        wait_for(
            lambda: serials.issuer.get(loop.serials[-1]) == other,
            GRACE + 30,
            f"Envoy presents {other}'s SVID (saw {[f'{s:x}' for s in loop.serials[-3:]]})",
        )
        switched_after = time.monotonic() - killed_at
        assert serving() == other_addr
        readyz = stack.admin_text("/readyz")
        assert f"upstream {first_addr}: disconnected for " in readyz
        assert f"upstream {other_addr}: connected, serving {WEB}" in readyz
        metrics = stack.admin_text("/metrics")
        assert f'sds_upstream_connected{{upstream="{first_addr}"}} 0.0' in metrics
        assert f'sds_upstream_serving{{spiffe_id="{WEB}",upstream="{other_addr}"}} 1.0' in metrics

        # The killed agent comes back; both rotate at their own pace (every 10-15 s):
        # the other one keeps serving.
        victim.start()
        victim.wait_svid(WEB)
        presented = len(loop.serials)
        wait_for(
            lambda: len(loop.serials) >= presented + 2, 60, "two more rotations after the return"
        )
        assert serving() == other_addr
        wait_for(  # the sampler may not have polled the newest serial yet
            lambda: all(s in serials.issuer for s in loop.serials), 15, "issuer of every serial"
        )
    finally:
        loop.stop()
        serials.stop()
    after_switch = loop.serials[loop.serials.index(_first_of(serials, loop.serials, other)) :]
    assert {serials.issuer.get(s, "?") for s in after_switch} == {other}
    assert loop.failures == []
    log = procs.log(stack.bridge)
    assert log.count("upstream.failover") == 1, log[-3000:]
    print(
        f"failover: Envoy presented {other}'s SVID {switched_after:.2f}s after kill -9 of {first}"
    )


def _first_of(log: SerialLog, serials: list[int], agent: str) -> int:
    return next(s for s in serials if log.issuer.get(s) == agent)
