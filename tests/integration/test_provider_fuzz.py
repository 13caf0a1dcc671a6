"""Seeded fuzzing of Workload API request frames and protobuf through the real provider.

The tests here start real processes (the bridge, the provider, peers), no Envoy; the others are in
``tests/unit/test_provider_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import os
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpclib.client import Channel

from sds._proto import workload_pb2 as pb
from sds._proto.workload_grpc import SpiffeWorkloadAPIStub
from sds._util.peercred import listen_unix
from sds.provider.ca import LocalCA
from sds.provider.identities import Identity
from sds.provider.service import SECURITY_HEADER, WorkloadApiProvider
from sds.spiffe.id import SpiffeId, TrustDomain
from tests.harness.fake_workload_api import eventually
from tests.harness.grpc_fuzz import frame, mutate
from tests.harness.h2async import RawClient
from tests.harness.logs import watched_logs
from tests.harness.resources import fd_count, rss_kb

pytestmark = pytest.mark.hostile

SEED = int(os.environ.get("WAPI_FUZZ_SEED", "20261202"))

CASES = int(os.environ.get("WAPI_FUZZ_CASES", "10000"))

SERVICE = "/SpiffeWorkloadAPI"

TD = TrustDomain("example.org")

HEADER = {SECURITY_HEADER: "true"}

# OK, INVALID_ARGUMENT, PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNIMPLEMENTED.
ALLOWED = {"0", "3", "7", "8", "12"}

STREAMS = {"FetchX509SVID", "FetchX509Bundles", "FetchJWTBundles"}


def seeds(ca: LocalCA) -> list[tuple[str, bytes]]:
    """Valid requests of each method: the starting points for mutation."""
    token = ca.issue_jwt_svid(SpiffeId.from_path(TD, "/web"), ["fuzz"], dt.timedelta(hours=1))
    return [
        ("FetchX509SVID", pb.X509SVIDRequest().SerializeToString()),
        ("FetchX509Bundles", pb.X509BundlesRequest().SerializeToString()),
        ("FetchJWTBundles", pb.JWTBundlesRequest().SerializeToString()),
        (
            "FetchJWTSVID",
            pb.JWTSVIDRequest(
                audience=["fuzz", "other"], spiffe_id=f"{TD.id}/web"
            ).SerializeToString(),
        ),
        ("FetchJWTSVID", pb.JWTSVIDRequest(audience=["fuzz"]).SerializeToString()),
        (
            "ValidateJWTSVID",
            pb.ValidateJWTSVIDRequest(audience="fuzz", svid=token).SerializeToString(),
        ),
    ]


def cases(seed: int, count: int, pool: list[tuple[str, bytes]]) -> list[tuple[str, bytes, bool]]:
    """(path, body, with the security header) for ``count`` mutated requests."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        method, message = rng.choice(pool)
        if rng.random() < 0.02:
            method = rng.choice(["NoSuchMethod", "FetchX509SVIDs", "fetchJWTSVID"])
        body = message if rng.random() < 0.05 else mutate(rng, message)
        out.append((f"{SERVICE}/{method}", frame(rng, body), rng.random() < 0.85))
    return out


@dataclass
class Provider:
    path: Path
    provider: WorkloadApiProvider


@pytest.fixture
async def providers(sockdir: Path) -> AsyncIterator[tuple[LocalCA, Provider, Provider]]:
    """One provider entitling every caller (us), one entitling nobody; the same CA."""
    ca = LocalCA.ephemeral(TD)
    web = Identity("web", SpiffeId.from_path(TD, "/web"))
    started = []
    for name, identities in (("in", [web]), ("out", [])):
        path = sockdir / f"{name}.sock"
        provider = WorkloadApiProvider(ca, identities)
        await provider.start(listen_unix(str(path)))
        started.append(Provider(path, provider))
    try:
        yield ca, started[0], started[1]
    finally:
        for p in started:
            await p.provider.close()


async def _good_client_served(path: Path) -> None:
    channel = Channel(path=str(path))
    try:
        stub = SpiffeWorkloadAPIStub(channel)
        ok = await stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=["a"]), metadata=HEADER)
        assert len(ok.svids) == 1
        async with stub.FetchX509SVID.open(metadata=HEADER) as stream:
            await stream.send_message(pb.X509SVIDRequest(), end=True)
            assert len((await stream.recv_message()).svids) == 1
            await stream.cancel()
    finally:
        channel.close()


async def _fuzz(
    path: Path, todo: list[tuple[str, bytes, bool]], statuses: collections.Counter[str]
) -> None:
    batch = 50  # streams in flight on the connection (h2's concurrency limit is 100)
    client = await RawClient.connect(str(path))
    try:
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            replies = [
                client.start(p, body, metadata=HEADER if header else None)
                for p, body, header in chunk
            ]
            # A served stream answers and stays open; anything else must end.
            waits = [
                r.answered if p.rsplit("/", 1)[1] in STREAMS else r.done
                for r, (p, _, _) in zip(replies, chunk, strict=True)
            ]
            try:
                await asyncio.wait_for(asyncio.gather(*(w.wait() for w in waits)), 30)
            except TimeoutError:
                stuck = [i + start for i, w in enumerate(waits) if not w.is_set()]
                pytest.fail(f"seed {SEED}: cases {stuck[:5]} on {path.name} got no answer (hang)")
            assert not client.closed.is_set(), f"seed {SEED}: the provider closed the connection"
            for sid, reply in list(client.replies.items()):
                if not reply.done.is_set():  # a served stream: it answered, now cancel it
                    client.conn.reset_stream(sid)
            client.writer.write(client.conn.data_to_send())
            for i, reply in enumerate(replies):
                p, body, header = chunk[i]
                if reply.status is None and reply.data and p.rsplit("/", 1)[1] in STREAMS:
                    statuses["stream"] += 1
                    continue
                statuses[str(reply.status)] += 1
                assert reply.status in ALLOWED, (
                    f"seed {SEED} case {start + i} on {path.name}: status {reply.status} "
                    f"{reply.message!r} for {p} header={header} {body[:80]!r}"
                )
            client.replies.clear()  # the test client's memory is not the server's
    finally:
        await client.close()


async def test_fuzzed_requests_through_the_real_provider(
    providers: tuple[LocalCA, Provider, Provider],
) -> None:
    with watched_logs() as problems:
        await _fuzz_both(providers, problems)


async def _fuzz_both(
    providers: tuple[LocalCA, Provider, Provider], problems: Callable[[], list[str]]
) -> None:
    ca, entitled, refused = providers
    todo = cases(SEED, CASES, seeds(ca))
    await _good_client_served(entitled.path)
    fds, rss = fd_count(), rss_kb()
    by_provider: dict[str, collections.Counter[str]] = {}
    for target, part in ((entitled, todo[::2]), (refused, todo[1::2])):
        statuses = by_provider[target.path.name] = collections.Counter()
        await _fuzz(target.path, part, statuses)
    print(f"seed {SEED}: {CASES} cases, statuses {by_provider}")
    ok, denied = by_provider["in.sock"], by_provider["out.sock"]
    assert ok["3"] > CASES // 10  # the mutations really were malformed, mostly
    assert ok["0"] + ok["stream"] > CASES // 100  # and some got through to be served
    assert denied["0"] == denied["stream"] == 0  # nobody is entitled there: nothing served
    assert denied["7"] > CASES // 4
    assert problems() == []
    await _good_client_served(entitled.path)
    await eventually(lambda: fd_count() <= fds + 2, what="fds back to baseline")
    await eventually(
        lambda: not entitled.provider.service._calls and not refused.provider.service._calls,
        what="every call to end",
    )
    grown = rss_kb() - rss
    print(f"RSS grew {grown / 1024:.1f} MB over {CASES} cases")
    assert grown < 16 * 1024
