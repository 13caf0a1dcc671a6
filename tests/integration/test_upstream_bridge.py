"""The bridge process with the upstream limits: JWT-SVID audiences capped and released when
the stream closes (issue 7 hole 7), and ``sds_upstream_connected`` per upstream (issue 9)."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest
from grpclib.client import Channel

from tests.conftest import Processes, wait_for
from tests.harness.sdsfake import sotw
from tests.harness.stack import Stack


def _metrics(stack: Stack) -> str:
    url = f"http://127.0.0.1:{stack.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


@pytest.mark.hostile
def test_300_jwt_audiences_on_one_stream_are_capped_and_released_on_close(
    procs: Processes, sockdir: Path
) -> None:
    stack = Stack(procs, sockdir)
    missing = sockdir / "down" / "api.sock"
    stack.write_config(
        workload_api=[f"unix://{stack.workload_socket}", f"unix://{missing}"],
        jwt_svids={"max_audiences": 64, "idle_timeout": "1s"},
    )
    stack.start_provider()
    stack.start_bridge()

    # One upstream down, one up: the gauge says which, and never 0 for the one serving.
    up = f'sds_upstream_connected{{upstream="unix://{stack.workload_socket}"}} 1.0'
    wait_for(lambda: up in _metrics(stack), 15, "the live upstream reported connected")
    metrics = _metrics(stack)
    assert up in metrics
    assert f'sds_upstream_connected{{upstream="unix://{missing}"}} 0.0' in metrics

    names = [f"jwt-svid:aud-{i:03d}" for i in range(300)]

    async def one_stream() -> int:
        channel = Channel(path=str(stack.sds_socket))
        try:
            async with sotw(channel, None) as stream:
                await stream.send(names)
                served: set[str] = set()
                while len(served) < 64:
                    received = await stream.recv(timeout=30)
                    served |= set(received.secrets)
                    await stream.ack()
                await stream.expect_silence(1.0)  # nothing beyond the cap arrives
                return len(served)
        finally:
            channel.close()

    assert asyncio.run(one_stream()) == 64
    log = procs.log(stack.bridge)
    assert log.count("jwt.fetched ") == 64
    assert "jwt.audience_refused" in log
    assert "(jwt_svids.max_audiences: 64)" in log
    # The stream closed: every audience, its token and its refresh task are released.
    wait_for(
        lambda: procs.log(stack.bridge).count("jwt.audience_dropped ") == 64,
        30,
        "64 audiences dropped after the stream closed",
    )
    secrets = [item["name"] for item in stack.admin("/secrets")]
    assert not [n for n in secrets if n.startswith("jwt-svid:")]
