"""The bridge fed by a real SPIRE 1.13.3 agent, each test against a real Envoy.

The tests here start real processes (the bridge, the provider, peers), no Envoy; the others are in
``tests/e2e/test_spire.py``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret
from grpclib.client import Channel
from grpclib.exceptions import GRPCError, StreamTerminatedError

from sds.tools import inspect_sds as sds_inspect
from tests.conftest import wait_for
from tests.harness.spire import CLIENT_A, TRUST_DOMAIN, WEB, Spire
from tests.harness.stack import Stack

pytestmark = pytest.mark.spire


@pytest.fixture(autouse=True)
def _spire_logs_on_failure(spire_logs_on_failure: None) -> None:
    """A failed test here prints the tails of the SPIRE server's and agent's logs."""


@pytest.fixture
def stack(spire_stack: Stack) -> Stack:
    """A bridge (``sds run``) whose only upstream is the session's SPIRE agent."""
    return spire_stack


def _inspect(*args: str) -> dict[str, object]:
    argv = [sys.executable, "-m", "sds", "inspect", *args, "--json"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    report: dict[str, object] = json.loads(out.stdout)
    return report


def test_sds_inspect_against_the_agent_and_the_bridge(spire: Spire, stack: Stack) -> None:
    stack.start_bridge()
    workload = _inspect("--path", f"unix://{spire.agent.socket}")
    svids = workload["x509_svids"]
    assert isinstance(svids, list)
    assert [s["spiffe_id"] for s in svids] == [WEB]
    assert [s["hint"] for s in svids] == ["web"]

    def same_serial() -> bool:
        agent = _inspect("--sds", f"unix://{spire.agent.socket}", "--name", "default")
        bridge = _inspect("--sds", f"unix://{stack.sds_socket}", "--name", "default")
        (a,) = agent["secrets"]  # type: ignore[misc]
        (b,) = bridge["secrets"]  # type: ignore[misc]
        assert a["spiffe_id"] == b["spiffe_id"] == WEB
        assert a["private_key"] == b["private_key"] == "present (not shown)"
        return bool(a["serial"] == b["serial"])  # one rotation may fall in between: retry

    wait_for(same_serial, 40, "agent SDS and bridge SDS to serve one serial")
    for sock in (spire.agent.socket, stack.sds_socket):
        report = _inspect("--sds", f"unix://{sock}", "--name", "ROOTCA")
        (rootca,) = report["secrets"]  # type: ignore[misc]
        assert rootca["validator"] == "spiffe"
        assert rootca["trust_domains"] == {TRUST_DOMAIN: 1}


def _probe(socket: Path, names: list[str], wait: float = 3.0) -> str:
    """What one StreamSecrets request for ``names`` gets: the served names, or the error."""

    async def go() -> str:
        channel = Channel(path=str(socket))
        try:
            response = await sds_inspect._ask(channel, names, wait, node_id="probe")
        except GRPCError as exc:
            return f"{exc.status.name}"
        except StreamTerminatedError as exc:
            return f"stream terminated: {exc}"
        finally:
            channel.close()
        if response is None:
            return "no response, stream open"
        served = sorted(Secret.parse(r.value).name for r in response.resources)
        return "served " + ",".join(served)

    return asyncio.run(go())


TD_NAME = f"spiffe://{TRUST_DOMAIN}"

# (request, SPIRE 1.13.3 agent, sds) as measured: the README's compatibility table.
NAMES_TABLE = [
    (["default"], "served default", "served default"),
    ([WEB], f"served {WEB}", f"served {WEB}"),
    (["ROOTCA"], "served ROOTCA", "served ROOTCA"),
    (["ALL"], "served ALL", "served ALL"),
    ([TD_NAME], f"served {TD_NAME}", f"served {TD_NAME}"),
    (["ROOTCA", "ALL"], "INVALID_ARGUMENT", "served ALL,ROOTCA"),
    (["ROOTCA", TD_NAME], "INVALID_ARGUMENT", f"served ROOTCA,{TD_NAME}"),
    (["nope"], "INVALID_ARGUMENT", "no response, stream open"),
    (["default", "nope"], "INVALID_ARGUMENT", "served default"),
    ([CLIENT_A], "INVALID_ARGUMENT", "no response, stream open"),
    ([], f"served {TD_NAME},{WEB}", f"served ALL,ROOTCA,default,{TD_NAME},{WEB}"),
]


@pytest.mark.parametrize(("names", "spire_answer", "sds_answer"), NAMES_TABLE)
def test_names_table_against_spire(
    spire: Spire, stack: Stack, names: list[str], spire_answer: str, sds_answer: str
) -> None:
    if stack.bridge is None:
        stack.start_bridge()
    assert (_probe(spire.agent.socket, names), _probe(stack.sds_socket, names)) == (
        spire_answer,
        sds_answer,
    )
