"""A strict fake of SPIRE's Delegated Identity API (agent admin socket), for unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream

from sds._proto import delegatedidentity_pb2 as pb
from sds._proto.delegatedidentity_grpc import DelegatedIdentityBase
from sds.spiffe.id import TrustDomain
from sds.spiffe.x509 import X509Bundle, X509Svid

NOT_BOTH = "must provide either selectors or non-zero PID, but not both"
NOT_DELEGATE = "caller not configured as an authorized delegate"
_DER = serialization.Encoding.DER


def svids_response(
    svids: Sequence[X509Svid], federates_with: Sequence[TrustDomain] = ()
) -> pb.SubscribeToX509SVIDsResponse:
    """A SubscribeToX509SVIDsResponse as SPIRE builds it (composeX509SVIDBySelectors)."""
    resp = pb.SubscribeToX509SVIDsResponse(federates_with=sorted(td.id for td in federates_with))
    for svid in svids:
        resp.x509_svids.append(
            pb.X509SVIDWithKey(
                x509_svid=pb.X509SVID(
                    cert_chain=[cert.public_bytes(_DER) for cert in svid.chain],
                    id=pb.SPIFFEID(
                        trust_domain=svid.spiffe_id.trust_domain.name, path=svid.spiffe_id.path
                    ),
                    expires_at=int(svid.not_after.timestamp()),
                    hint=svid.hint,
                ),
                x509_svid_key=svid.key_der(),
            )
        )
    return resp


def _metadata(stream: Stream[Any, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (stream.metadata or {}).items()}


@dataclass
class Request:
    method: str
    message: Any
    metadata: dict[str, str]


@dataclass
class FakeAgent(DelegatedIdentityBase):
    """A SPIRE agent's Delegated Identity API with scripted state, checking requests strictly."""

    authorized: bool = True
    knows_pid: bool = True  # False: an agent that predates the pid field and never sees it
    workloads: dict[int, pb.SubscribeToX509SVIDsResponse] = field(default_factory=dict)
    x509_bundles: dict[str, bytes] = field(default_factory=dict)
    jwt_bundles: dict[str, bytes] = field(default_factory=dict)
    jwt_svids: dict[int, list[pb.JWTSVID]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    transports: dict[str, list[Any]] = field(default_factory=dict)
    _streams: dict[str, set[tuple[int, asyncio.Queue[Any]]]] = field(default_factory=dict)
    _server: Server | None = None

    async def start(self, path: Path) -> str:
        self._server = Server([self])
        await self._server.start(path=str(path))
        return f"unix://{path}"

    async def stop(self) -> None:
        """Stop and drop every connection, as a killed agent would (the socket file stays)."""
        assert self._server is not None
        self._server.close()
        for transports in self.transports.values():
            for transport in transports:
                transport.close()
        await self._server.wait_closed()
        self._server = None

    # -- scripting ---------------------------------------------------------------

    def set_workload(self, pid: int, resp: pb.SubscribeToX509SVIDsResponse) -> None:
        self.workloads[pid] = resp
        self._push("SubscribeToX509SVIDs", resp, pid)

    def set_bundles(self, *bundles: X509Bundle) -> None:
        self.x509_bundles = {b.trust_domain.id: b.der() for b in bundles}
        self._push("SubscribeToX509Bundles", self._bundles_response())

    def set_jwt_bundles(self, bundles: dict[str, bytes]) -> None:
        self.jwt_bundles = bundles
        self._push("SubscribeToJWTBundles", pb.SubscribeToJWTBundlesResponse(bundles=bundles))

    def fail_streams(self, method: str, status: Status, message: str) -> None:
        self._push(method, GRPCError(status, message))

    def open_streams(self, method: str) -> int:
        return len(self._streams.get(method, ()))

    def count(self, method: str) -> int:
        return sum(1 for r in self.requests if r.method == method)

    # -- internals ---------------------------------------------------------------

    def _bundles_response(self) -> pb.SubscribeToX509BundlesResponse:
        return pb.SubscribeToX509BundlesResponse(ca_certificates=self.x509_bundles)

    def _push(self, method: str, item: Any, pid: int = 0) -> None:
        for key, queue in self._streams.get(method, ()):
            if not pid or key == pid:
                queue.put_nowait(item)

    async def _begin(self, stream: Stream[Any, Any], method: str) -> Any:
        transport = getattr(stream.peer, "_transport", None)
        if transport is not None:
            self.transports.setdefault(method, []).append(transport)
        request = await stream.recv_message()
        self.requests.append(Request(method, request, _metadata(stream)))
        if not self.authorized:  # isCallerAuthorized runs first
            raise GRPCError(Status.PERMISSION_DENIED, NOT_DELEGATE)
        return request

    @staticmethod
    def _pid(request: Any, knows_pid: bool) -> int:
        """constructValidSelectorsFromReq: exactly one of selectors and a non-zero pid."""
        pid = request.pid if knows_pid else 0
        if (pid != 0) == bool(request.selectors):
            raise GRPCError(Status.INVALID_ARGUMENT, NOT_BOTH)
        assert not request.selectors, "sds sends a pid, never selectors"
        return int(pid)

    async def _serve(self, stream: Stream[Any, Any], method: str, first: Any, pid: int = 0) -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        entry = (pid, queue)
        self._streams.setdefault(method, set()).add(entry)
        try:
            await stream.send_message(first)
            while True:
                item = await queue.get()
                if isinstance(item, GRPCError):
                    raise item
                await stream.send_message(item)
        finally:
            self._streams[method].discard(entry)

    # -- the API -----------------------------------------------------------------

    async def SubscribeToX509SVIDs(self, stream: Stream[Any, Any]) -> None:
        request = await self._begin(stream, "SubscribeToX509SVIDs")
        pid = self._pid(request, self.knows_pid)
        first = self.workloads.get(pid, pb.SubscribeToX509SVIDsResponse())
        await self._serve(stream, "SubscribeToX509SVIDs", first, pid)

    async def SubscribeToX509Bundles(self, stream: Stream[Any, Any]) -> None:
        await self._begin(stream, "SubscribeToX509Bundles")
        await self._serve(stream, "SubscribeToX509Bundles", self._bundles_response())

    async def FetchJWTSVIDs(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self.requests.append(Request("FetchJWTSVIDs", request, _metadata(stream)))
        if not request.audience:
            raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
        if not self.authorized:
            raise GRPCError(Status.PERMISSION_DENIED, NOT_DELEGATE)
        svids = self.jwt_svids.get(self._pid(request, self.knows_pid))
        if not svids:
            raise GRPCError(Status.PERMISSION_DENIED, "no identity issued")
        await stream.send_message(pb.FetchJWTSVIDsResponse(svids=svids))

    async def SubscribeToJWTBundles(self, stream: Stream[Any, Any]) -> None:
        await self._begin(stream, "SubscribeToJWTBundles")
        first = pb.SubscribeToJWTBundlesResponse(bundles=self.jwt_bundles)
        await self._serve(stream, "SubscribeToJWTBundles", first)
