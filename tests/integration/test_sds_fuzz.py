"""Seeded fuzzing of SDS request frames and protobuf through the real server.

10,000 mutated requests (bit flips, truncation, insertion, bad varints, wrong gRPC
prefixes) from valid StreamSecrets, DeltaSecrets and FetchSecrets requests go through
one HTTP/2 connection to an in-process :class:`SdsServer`. Every call must end with a
status a gRPC peer understands (never UNKNOWN or INTERNAL), never hang, never log a
traceback; afterwards a good client is still served and fds and RSS are back near where
they started. ``SDS_FUZZ_SEED`` and ``SDS_FUZZ_CASES`` reproduce or lengthen a run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random

import pytest
from envoy_data_plane.envoy.config.core.v3 import BuildVersion, Node
from envoy_data_plane.envoy.service.discovery.v3 import (
    DeltaDiscoveryRequest,
    DiscoveryRequest,
)
from envoy_data_plane.envoy.type.v3 import SemanticVersion
from envoy_data_plane.google.protobuf import Struct, Value
from envoy_data_plane.google.rpc import Status as RpcStatus
from google.protobuf.message import DecodeError

from sds.xds.codec import (
    LiteDeltaRequest,
    LiteRequest,
    WireError,
    delta_request,
    node_info,
    sotw_request,
)
from tests.harness.fake_workload_api import eventually
from tests.harness.grpc_fuzz import frame, mutate
from tests.harness.h2async import SERVICE
from tests.harness.resources import fd_count, rss_kb
from tests.harness.sds_server import (
    SECRET_TYPE,
    Served,
    good_client_still_served,
    no_tracebacks,
)

pytestmark = pytest.mark.hostile

SEED = int(os.environ.get("SDS_FUZZ_SEED", "20261202"))
CASES = int(os.environ.get("SDS_FUZZ_CASES", "10000"))
# OK, INVALID_ARGUMENT, NOT_FOUND (Fetch), RESOURCE_EXHAUSTED, UNIMPLEMENTED.
ALLOWED = {"0", "3", "5", "8", "12"}


def _node() -> Node:
    return Node(
        id="fuzz-envoy",
        cluster="fuzz",
        metadata=Struct(fields={"disable_spiffe_cert_validation": Value(string_value="true")}),
        user_agent_build_version=BuildVersion(
            version=SemanticVersion(major_number=1, minor_number=40, patch=0)
        ),
    )


def seeds() -> list[tuple[str, bytes]]:
    """Valid requests of each method: the starting points for mutation."""
    names = ["default", "ROOTCA", "ALL", "spiffe://example.org/web", "nope"]
    return [
        (
            "StreamSecrets",
            bytes(DiscoveryRequest(type_url=SECRET_TYPE, resource_names=names, node=_node())),
        ),
        (
            "StreamSecrets",
            bytes(
                DiscoveryRequest(
                    type_url=SECRET_TYPE,
                    version_info="inst1-1",
                    response_nonce="inst1-n1",
                    resource_names=["default"],
                    error_detail=RpcStatus(code=3, message="rejected"),
                )
            ),
        ),
        (
            "DeltaSecrets",
            bytes(
                DeltaDiscoveryRequest(
                    type_url=SECRET_TYPE,
                    resource_names_subscribe=names,
                    resource_names_unsubscribe=["ALL"],
                    initial_resource_versions={"default": "old-1"},
                    node=_node(),
                )
            ),
        ),
        (
            "DeltaSecrets",
            bytes(
                DeltaDiscoveryRequest(
                    type_url=SECRET_TYPE,
                    response_nonce="inst1-n2",
                    error_detail=RpcStatus(code=3, message="bad"),
                )
            ),
        ),
        ("FetchSecrets", bytes(DiscoveryRequest(type_url=SECRET_TYPE, resource_names=names))),
    ]


def cases(seed: int, count: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    pool = seeds()
    out = []
    for _ in range(count):
        method, message = rng.choice(pool)
        if rng.random() < 0.02:
            method = rng.choice(["NoSuchMethod", "StreamSecret", "fetchSecrets"])
        out.append((f"{SERVICE}/{method}", frame(rng, mutate(rng, message))))
    return out


def test_codec_raises_only_wire_errors() -> None:
    """The request messages and the node reader, alone: any input is a request, or a
    DecodeError (which the server answers with INVALID_ARGUMENT), or a WireError."""
    rng = random.Random(SEED)
    pool = [message for _, message in seeds()]
    decoders = (
        lambda data: sotw_request(LiteRequest.FromString(data)),
        lambda data: delta_request(LiteDeltaRequest.FromString(data)),
        node_info,
    )
    for _ in range(CASES):
        data = mutate(rng, rng.choice(pool))
        for decode in decoders:
            with contextlib.suppress(DecodeError, WireError):
                decode(data)


async def test_fuzzed_requests_through_the_real_server(
    served: Served,
    caplog: pytest.LogCaptureFixture,
) -> None:
    batch = 50  # streams in flight on the connection (h2's concurrency limit is 100)
    todo = cases(SEED, CASES)
    await good_client_still_served(served)
    fds, rss = fd_count(), rss_kb()
    statuses: collections.Counter[str | None] = collections.Counter()
    client = await served.raw()
    try:
        for start in range(0, len(todo), batch):
            replies = [client.start(path, body) for path, body in todo[start : start + batch]]
            try:
                await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in replies)), 30)
            except TimeoutError:
                stuck = [i + start for i, r in enumerate(replies) if not r.done.is_set()]
                pytest.fail(f"seed {SEED}: cases {stuck[:5]} got no answer (hang)")
            assert not client.closed.is_set(), f"seed {SEED}: the server closed the connection"
            client.replies.clear()  # the test client's memory is not the server's
            for i, reply in enumerate(replies):
                statuses[reply.status] += 1
                assert reply.status in ALLOWED, (
                    f"seed {SEED} case {start + i}: status {reply.status} {reply.message!r} "
                    f"for {todo[start + i][1][:80]!r}"
                )
    finally:
        await client.close()
    print(f"seed {SEED}: {CASES} cases, statuses {dict(statuses)}")
    assert statuses["3"] > CASES // 10  # the mutations really were malformed, mostly
    no_tracebacks(caplog)
    await good_client_still_served(served)
    await eventually(lambda: fd_count() <= fds + 2, what="fds back to baseline")
    grown = rss_kb() - rss
    print(f"RSS grew {grown / 1024:.1f} MB over {CASES} cases")
    assert grown < 50 * 1024
    await eventually(lambda: not served.servicer.streams, what="every stream to close")
    assert served.servicer.cache.watch_count == 0
