"""A grpclib client's side of the Workload API: the security header, streams, SVIDs read back."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from cryptography.hazmat.primitives import serialization

from sds.provider.ca import LocalCA
from sds.spiffe.id import TrustDomain
from sds.spiffe.x509 import X509Svid

OTHER = TrustDomain("other.org")

THIRD = TrustDomain("third.org")

# The security header every Workload API call must carry (the SPIFFE Workload API standard).
HEADER = {"workload.spiffe.io": "true"}

# The FetchJWTSVID method's path, for raw HTTP/2 clients.
JWT = "/SpiffeWorkloadAPI/FetchJWTSVID"

TIMEOUT = 10.0


@contextlib.asynccontextmanager
async def opened(method: Any, request: Any, metadata: Any = HEADER) -> AsyncIterator[Any]:
    """An open server stream; it is cancelled (RST_STREAM) on the way out."""
    async with method.open(metadata=metadata) as stream:
        await stream.send_message(request, end=True)
        try:
            yield stream
        finally:
            with contextlib.suppress(Exception):
                await stream.cancel()


async def first(method: Any, request: Any, metadata: Any = HEADER) -> Any:
    """Open a server stream, return its first message, and hang up."""
    async with opened(method, request, metadata) as stream, asyncio.timeout(TIMEOUT):
        return await stream.recv_message()


def svids_of(response: Any) -> list[X509Svid]:
    return [
        X509Svid.parse(s.spiffe_id, s.x509_svid, s.x509_svid_key, s.hint) for s in response.svids
    ]


def other_ca_jwks(ca: LocalCA) -> bytes:
    """A SPIFFE bundle JWKS for ``ca``: its CA certificate (x509-svid) and JWT key."""
    doc = json.loads(ca.jwt_bundle.to_jwks())
    der = ca.bundle.authorities[0].public_bytes(serialization.Encoding.DER)
    doc["keys"].append(
        {"use": "x509-svid", "kty": "EC", "kid": "ca", "x5c": [base64.b64encode(der).decode()]}
    )
    return json.dumps(doc).encode()
