"""A strict, scriptable, in-process SPIFFE Workload API server for unit tests.

It runs on the test's event loop (grpclib server on a Unix socket or TCP),
serves whatever state the test sets, pushes updates to open streams, and
checks every request like a real server would:

* the security header ``workload.spiffe.io: true`` must be present
  (Workload API s.5.2); otherwise the call fails ``INVALID_ARGUMENT`` and the
  violation is recorded in :attr:`FakeWorkloadApi.violations` (tests assert it
  stays empty);
* ``FetchJWTSVID`` needs at least one audience;
* a caller with no X.509 state gets ``PERMISSION_DENIED``.

Faults are scripted per method with :meth:`FakeWorkloadApi.fault`; open
streams can be failed with :meth:`FakeWorkloadApi.fail_streams`.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import struct_pb2
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream

from sds._proto import workload_pb2
from sds._proto.workload_grpc import SpiffeWorkloadAPIBase
from sds.errors import InvalidJwt
from sds.spiffe.id import SpiffeId, TrustDomain
from sds.spiffe.jwt import JwtBundle, sign_jwt_svid, validate_jwt_svid
from sds.spiffe.x509 import X509Bundle, X509Svid

__all__ = ["FakeWorkloadApi", "JwtIssuer", "eventually", "x509_response"]

HEADER = "workload.spiffe.io"


async def eventually(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "",
) -> Any:
    """Await until ``predicate()`` is truthy (polling the loop); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


def x509_response(
    svids: Sequence[X509Svid],
    bundles: Sequence[X509Bundle],
    federated: Sequence[X509Bundle] = (),
    *,
    raw_bundle: bytes | None = None,
) -> Any:
    """An X509SVIDResponse: each SVID carries the bundle of its own trust domain.

    ``raw_bundle`` replaces every SVID's ``bundle`` field with these bytes
    (to send a malformed bundle).
    """
    by_td = {b.trust_domain: b for b in bundles}
    resp = workload_pb2.X509SVIDResponse()
    for svid in svids:
        own = by_td.get(svid.spiffe_id.trust_domain)
        resp.svids.append(
            workload_pb2.X509SVID(
                spiffe_id=str(svid.spiffe_id),
                x509_svid=svid.chain_der(),
                x509_svid_key=svid.key_der(),
                bundle=raw_bundle if raw_bundle is not None else (own.der() if own else b""),
                hint=svid.hint,
            )
        )
    for bundle in federated:
        resp.federated_bundles[bundle.trust_domain.id] = bundle.der()
    return resp


@dataclass
class JwtIssuer:
    """Signs JWT-SVIDs for the fake: one key for one trust domain, identities with hints."""

    trust_domain: TrustDomain
    identities: list[tuple[SpiffeId, str]]
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    kid: str = "test-kid-1"
    ttl: int = 300

    @property
    def bundle(self) -> JwtBundle:
        """The JWT bundle holding this issuer's public key."""
        return JwtBundle(self.trust_domain, {self.kid: self.key.public_key()})


@dataclass
class Fault:
    """A scripted failure: ``status``/``message``, for ``times`` calls (None: every call).

    With ``after_first`` the call first sends the current state, then fails.
    """

    status: Status
    message: str
    times: int | None = 1
    after_first: bool = False


@dataclass
class Call:
    """One call the fake received."""

    method: str
    at: float
    metadata: dict[str, str]


class FakeWorkloadApi(SpiffeWorkloadAPIBase):
    """Serves scripted Workload API state; see the module docstring for the checks."""

    def __init__(self) -> None:
        self.x509: Any = None  # X509SVIDResponse; None: the caller has no identity
        self.x509_bundles: dict[str, bytes] = {}
        self.jwt_bundles: dict[str, bytes] = {}
        self.jwt_issuer: JwtIssuer | None = None
        self.calls: list[Call] = []
        self.violations: list[str] = []
        self.faults: dict[str, list[Fault]] = {}
        self._streams: dict[str, set[asyncio.Queue[Any]]] = {}
        self._server: Server | None = None
        self._transports: set[Any] = set()
        self.address = ""

    # -- lifecycle ---------------------------------------------------------------

    async def start_unix(self, path: Path) -> str:
        """Serve on the Unix socket ``path``; returns the ``unix://`` address."""
        self._server = Server([self])
        await self._server.start(path=str(path))
        self.address = f"unix://{path}"
        return self.address

    async def start_tcp(self) -> str:
        """Serve on 127.0.0.1 on a free port; returns the ``tcp://`` address."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self._server = Server([self])
        await self._server.start(sock=sock)
        self.address = f"tcp://127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        """Stop serving and drop every connection (the socket file stays, as after a crash)."""
        if self._server is not None:
            self._server.close()
            # grpclib's close() leaves accepted connections open; a dead process would not.
            for transport in self._transports:
                transport.close()
            self._transports.clear()
            await self._server.wait_closed()
            self._server = None

    # -- scripting ---------------------------------------------------------------

    def set_x509(self, resp: Any) -> None:
        """Make ``resp`` the X.509 state and push it to every open FetchX509SVID stream."""
        self.x509 = resp
        self._push("FetchX509SVID", resp)

    def set_jwt_bundles(self, bundles: Sequence[JwtBundle]) -> None:
        """Make ``bundles`` the JWT bundles and push them to every open FetchJWTBundles stream."""
        self.jwt_bundles = {b.trust_domain.id: b.to_jwks() for b in bundles}
        self._push("FetchJWTBundles", workload_pb2.JWTBundlesResponse(bundles=self.jwt_bundles))

    def set_raw_jwt_bundles(self, bundles: dict[str, bytes]) -> None:
        """Serve these ``"spiffe://td" -> JWKS bytes`` as-is (to send a malformed JWKS)."""
        self.jwt_bundles = dict(bundles)
        self._push("FetchJWTBundles", workload_pb2.JWTBundlesResponse(bundles=self.jwt_bundles))

    def deny(self, message: str) -> None:
        """The caller loses its identity: open X.509 streams and new calls get PERMISSION_DENIED."""
        self.x509 = None
        self._push("FetchX509SVID", Fault(Status.PERMISSION_DENIED, message))

    def fault(
        self,
        method: str,
        status: Status,
        message: str,
        times: int | None = 1,
        *,
        after_first: bool = False,
    ) -> None:
        """Fail the next ``times`` calls of ``method`` (None: all of them)."""
        self.faults.setdefault(method, []).append(Fault(status, message, times, after_first))

    def fail_streams(self, method: str, status: Status, message: str) -> None:
        """End every open stream of ``method`` with ``status``."""
        self._push(method, Fault(status, message))

    def count(self, method: str) -> int:
        """How many calls of ``method`` arrived."""
        return sum(1 for call in self.calls if call.method == method)

    def open_streams(self, method: str) -> int:
        """How many streams of ``method`` are open now."""
        return len(self._streams.get(method, ()))

    # -- internals ---------------------------------------------------------------

    def _push(self, method: str, item: Any) -> None:
        for queue in self._streams.get(method, ()):
            queue.put_nowait(item)

    async def _begin(self, stream: Stream[Any, Any], method: str) -> Any:
        transport = getattr(stream.peer, "_transport", None)  # as sds._util.peercred reads it
        if transport is not None:
            self._transports.add(transport)
        request = await stream.recv_message()
        metadata = dict(stream.metadata or {})
        self.calls.append(Call(method, time.monotonic(), metadata))
        if metadata.get(HEADER) != "true":
            self.violations.append(f"{method}: security header missing or wrong: {metadata}")
            raise GRPCError(Status.INVALID_ARGUMENT, "security header missing from request")
        return request

    def _take_fault(self, method: str) -> Fault | None:
        queue = self.faults.get(method)
        if not queue:
            return None
        fault = queue[0]
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                queue.pop(0)
        return fault

    async def _serve_stream(
        self, stream: Stream[Any, Any], method: str, first: Callable[[], Any]
    ) -> None:
        await self._begin(stream, method)
        fault = self._take_fault(method)
        if fault is not None and not fault.after_first:
            raise GRPCError(fault.status, fault.message)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._streams.setdefault(method, set()).add(queue)
        try:
            await stream.send_message(first())
            if fault is not None:
                raise GRPCError(fault.status, fault.message)
            while True:
                item = await queue.get()
                if isinstance(item, Fault):
                    raise GRPCError(item.status, item.message)
                await stream.send_message(item)
        finally:
            self._streams[method].discard(queue)

    # -- the Workload API ------------------------------------------------------------

    async def FetchX509SVID(self, stream: Stream[Any, Any]) -> None:
        def first() -> Any:
            if self.x509 is None:
                raise GRPCError(Status.PERMISSION_DENIED, "no identity issued")
            return self.x509

        if self.x509 is None:
            await self._begin(stream, "FetchX509SVID")
            raise GRPCError(Status.PERMISSION_DENIED, "no identity issued")
        await self._serve_stream(stream, "FetchX509SVID", first)

    async def FetchX509Bundles(self, stream: Stream[Any, Any]) -> None:
        await self._serve_stream(
            stream,
            "FetchX509Bundles",
            lambda: workload_pb2.X509BundlesResponse(bundles=self.x509_bundles),
        )

    async def FetchJWTBundles(self, stream: Stream[Any, Any]) -> None:
        await self._serve_stream(
            stream,
            "FetchJWTBundles",
            lambda: workload_pb2.JWTBundlesResponse(bundles=self.jwt_bundles),
        )

    async def FetchJWTSVID(self, stream: Stream[Any, Any]) -> None:
        request = await self._begin(stream, "FetchJWTSVID")
        fault = self._take_fault("FetchJWTSVID")
        if fault is not None:
            raise GRPCError(fault.status, fault.message)
        if not request.audience:
            raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
        issuer = self.jwt_issuer
        if issuer is None:
            raise GRPCError(Status.PERMISSION_DENIED, "no identity issued")
        resp = workload_pb2.JWTSVIDResponse()
        for sid, hint in issuer.identities:
            if request.spiffe_id and request.spiffe_id != str(sid):
                continue
            token = sign_jwt_svid(issuer.key, issuer.kid, sid, list(request.audience), issuer.ttl)
            resp.svids.append(workload_pb2.JWTSVID(spiffe_id=str(sid), svid=token, hint=hint))
        await stream.send_message(resp)

    async def ValidateJWTSVID(self, stream: Stream[Any, Any]) -> None:
        request = await self._begin(stream, "ValidateJWTSVID")
        if not request.audience or not request.svid:
            raise GRPCError(Status.INVALID_ARGUMENT, "audience and svid must be specified")
        issuer = self.jwt_issuer
        bundles = {issuer.trust_domain: issuer.bundle} if issuer else {}
        try:
            claims = validate_jwt_svid(request.svid, request.audience, bundles)
        except InvalidJwt as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from exc
        struct = struct_pb2.Struct()
        struct.update(dict(claims.claims))
        await stream.send_message(
            workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(claims.spiffe_id), claims=struct)
        )
