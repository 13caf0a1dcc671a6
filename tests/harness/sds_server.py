"""An in-process SDS server with fixed material, for hostile-client and fuzz tests.

:func:`serve_sds` starts a real :class:`SdsServer` over a Unix socket, fed by a
:class:`StaticSource` holding one ``web`` SVID from an ephemeral CA.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpclib.client import Channel

from sds._util.peercred import bind_unix_socket
from sds.bridge.config import BridgeConfig
from sds.bridge.metrics import Metrics
from sds.bridge.state import Bridge
from sds.provider.ca import LocalCA
from sds.spiffe.id import SpiffeId, TrustDomain
from sds.spiffe.x509 import BundleSet, X509Context
from sds.xds.cache import SecretCache
from sds.xds.service import SdsServer, SdsServicer
from tests.harness.h2async import RawClient
from tests.harness.sdsfake import sotw
from tests.harness.static_upstream import StaticSource

TD = TrustDomain("example.org")
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


@dataclass
class Served:
    path: str
    servicer: SdsServicer
    server: SdsServer
    metrics: Metrics
    source: StaticSource
    ca: LocalCA

    async def raw(self) -> RawClient:
        return await RawClient.connect(self.path)

    def context(self) -> X509Context:
        svid = self.ca.issue_x509_svid(SpiffeId.from_path(TD, "/web"), dt.timedelta(hours=1))
        return X509Context((svid,), BundleSet([self.ca.bundle]))


async def serve_sds(sockdir: Path, **server_options: float) -> Served:
    ca = LocalCA.ephemeral(TD)
    source = StaticSource(None)
    metrics = Metrics()
    bridge = Bridge(BridgeConfig(), [source], cache=SecretCache("inst1"), metrics=metrics)
    servicer = SdsServicer(bridge.cache, events=metrics)
    server = SdsServer(servicer, **server_options)
    path = str(sockdir / "sds.sock")
    await server.start(sock=bind_unix_socket(path))
    served = Served(path, servicer, server, metrics, source, ca)
    source.set(served.context())
    return served


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not bad, [r.getMessage() for r in bad][:3]


async def good_client_still_served(served: Served) -> None:
    channel = Channel(path=served.path)
    try:
        async with sotw(channel, "inst1") as s:
            await s.send(["default"])
            assert "default" in (await s.recv()).secrets
    finally:
        channel.close()
