"""Issue 3 acceptance with a real Envoy: mTLS over our SDS, authorization, rotation, restarts.

The tests here start real processes (the bridge, the provider, peers), no Envoy; the others are in
``tests/e2e/test_e2e_envoy.py``.
"""

from __future__ import annotations

import asyncio
import os
import re

import pytest
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret
from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryRequest, DiscoveryResponse
from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError

from tests.harness.asuser import run_as
from tests.harness.stack import Stack


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_uid_not_in_allowed_uids_gets_permission_denied(stack: Stack) -> None:
    stack.write_config(allowed_uids=[0], socket_mode="0660")
    stack.start_provider()
    stack.start_bridge()
    os.chmod(stack.sds_socket.parent, 0o755)
    # A fork of this interpreter, so it works wherever the checkout and the venv live.
    denied = run_as(1000, fetch_default, str(stack.sds_socket), gid=0)
    assert denied == (
        "PERMISSION_DENIED uid=1000 gid=0 pid=<pid> is not allowed to fetch secrets "
        "(not in allowed_uids/allowed_gids)"
    )
    assert "PRIVATE KEY" not in denied
    assert run_as(0, fetch_default, str(stack.sds_socket), gid=0) == "OK default"


async def _fetch_default(socket_path: str) -> str:
    channel = Channel(path=socket_path)
    try:
        async with channel.request(
            "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets",
            Cardinality.UNARY_UNARY,
            DiscoveryRequest,
            DiscoveryResponse,
        ) as stream:
            await stream.send_message(DiscoveryRequest(resource_names=["default"]), end=True)
            response = await stream.recv_message()
        assert response is not None
        return f"OK {Secret.parse(response.resources[0].value).name}"
    except GRPCError as exc:
        message = re.sub(r"pid=\d+", "pid=<pid>", exc.message or "")
        return f"{exc.status.name} {message}"
    finally:
        channel.close()


def fetch_default(socket_path: str) -> str:
    """FetchSecrets ``default`` once; "OK <name>" or "<STATUS> <message>" (run via run_as)."""
    return asyncio.run(_fetch_default(socket_path))
