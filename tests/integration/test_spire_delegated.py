"""SPIRE 1.13.3's Delegated Identity API, the wire facts the per-caller bridge relies on.

The test process (uid 0) is the authorized delegate ``BRIDGE`` of the session's delegated
agent (:class:`tests.harness.spire.SpireDelegated`); ``sleep`` children as other uids stand in
for the Envoys whose pids the delegate names. Straight on the generated grpclib stub, so these
pin SPIRE's behaviour (``pkg/agent/api/delegatedidentity/v1/service.go``), not ours.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from sds._proto import delegatedidentity_pb2 as pb
from sds._proto.delegatedidentity_grpc import DelegatedIdentityStub
from sds.spiffe.x509 import split_der_certificates
from tests.harness.asuser import run_as, start_as
from tests.harness.procs import Processes
from tests.harness.spire import BRIDGE, TRUST_DOMAIN, SpireDelegated

pytestmark = pytest.mark.spire

ENVOY_A = f"spiffe://{TRUST_DOMAIN}/envoy-a"
ENVOY_B = f"spiffe://{TRUST_DOMAIN}/envoy-b"
OUTSIDER = f"spiffe://{TRUST_DOMAIN}/outsider"
UID_A, UID_B, UID_OUTSIDER, UID_NOBODY, UID_DELETED = 40001, 40002, 40003, 40004, 40005
UID_LATE = 40006
SLEEP = ["/usr/bin/sleep", "600"]

X509Svids = list[tuple[str, str]]  # (SPIFFE ID, hint) per SVID of one response


def _ids(response: pb.SubscribeToX509SVIDsResponse) -> X509Svids:
    return [
        (f"spiffe://{s.x509_svid.id.trust_domain}{s.x509_svid.id.path}", s.x509_svid.hint)
        for s in response.x509_svids
    ]


def _exited_pid() -> int:
    """The pid of a child that has exited and been reaped (free until the kernel reuses it)."""
    with subprocess.Popen(["/usr/bin/true"]) as gone:
        gone.wait(timeout=10)
    return gone.pid


class Admin:
    """A grpclib channel to the delegated agent's admin socket, as the delegate."""

    def __init__(self, socket: Path) -> None:
        self.channel = Channel(path=str(socket))
        self.stub = DelegatedIdentityStub(self.channel)

    async def first_x509(
        self, request: pb.SubscribeToX509SVIDsRequest, timeout: float = 10.0
    ) -> pb.SubscribeToX509SVIDsResponse:
        """The first message of a SubscribeToX509SVIDs stream (the stream is then cancelled)."""
        async with self.stub.SubscribeToX509SVIDs.open(timeout=timeout) as stream:
            await stream.send_message(request, end=True)
            message = await stream.recv_message()
            await stream.cancel()
        assert message is not None
        return message

    async def wait_x509(self, pid: int, spiffe_id: str, timeout: float = 30.0) -> None:
        """Until the agent has synced the entry that gives ``pid`` ``spiffe_id``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            message = await self.first_x509(pb.SubscribeToX509SVIDsRequest(pid=pid))
            if [i for i, _ in _ids(message)] == [spiffe_id]:
                return
            assert loop.time() < deadline, f"pid {pid} never got {spiffe_id}: {_ids(message)}"
            await asyncio.sleep(0.5)


@pytest.fixture(scope="module")
def workloads(
    spire_delegated: SpireDelegated, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Envoy stand-ins: ``sleep`` as UID_A (envoy-a), UID_B (envoy-b), UID_NOBODY (no entry);
    the two entries are deleted after the module."""
    procs = Processes(tmp_path_factory.mktemp("delegated-workloads"))
    # Deleted at the end: the agent is the session's, and other modules register these uids.
    entries = [
        spire_delegated.register(UID_A, ENVOY_A, hint="a"),
        spire_delegated.register(UID_B, ENVOY_B),
    ]
    try:
        yield {
            "a": start_as(procs, UID_A, SLEEP, "envoy-a"),
            "b": start_as(procs, UID_B, SLEEP, "envoy-b"),
            "nobody": start_as(procs, UID_NOBODY, SLEEP, "nobody"),
        }
    finally:
        procs.close()
        for entry in entries:
            spire_delegated.server.entry_delete(entry)


@pytest.fixture
async def admin(
    spire_delegated: SpireDelegated, workloads: dict[str, subprocess.Popen[bytes]]
) -> AsyncIterator[Admin]:
    """The delegate's channel, once the agent has synced both workloads' entries."""
    client = Admin(spire_delegated.admin_socket)
    await client.wait_x509(workloads["a"].pid, ENVOY_A)
    await client.wait_x509(workloads["b"].pid, ENVOY_B)
    yield client
    client.channel.close()


async def test_pid_gets_exactly_its_own_svid_with_its_key(
    admin: Admin, workloads: dict[str, subprocess.Popen[bytes]]
) -> None:
    a = await admin.first_x509(pb.SubscribeToX509SVIDsRequest(pid=workloads["a"].pid))
    b = await admin.first_x509(pb.SubscribeToX509SVIDsRequest(pid=workloads["b"].pid))
    assert _ids(a) == [(ENVOY_A, "a")]  # not the delegate's BRIDGE, not envoy-b
    assert _ids(b) == [(ENVOY_B, "")]
    assert list(a.federates_with) == []
    (svid,) = a.x509_svids
    assert len(svid.x509_svid.cert_chain) == 1  # the leaf only, DER
    leaf = x509.load_der_x509_certificate(svid.x509_svid.cert_chain[0])
    uri = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uri.get_values_for_type(x509.UniformResourceIdentifier) == [ENVOY_A]
    assert svid.x509_svid.expires_at == int(leaf.not_valid_after_utc.timestamp())
    key = serialization.load_der_private_key(svid.x509_svid_key, None)  # PKCS#8 DER
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*spki) == leaf.public_key().public_bytes(*spki)


async def test_the_delegates_own_pid_gets_the_delegates_svid(admin: Admin) -> None:
    """Nothing in SPIRE stops a delegate naming itself: the bridge must not forward it."""
    own = await admin.first_x509(pb.SubscribeToX509SVIDsRequest(pid=os.getpid()))
    assert _ids(own) == [(BRIDGE, "bridge")]


async def test_bundles_are_keyed_by_trust_domain_id(admin: Admin) -> None:
    async with admin.stub.SubscribeToX509Bundles.open(timeout=10) as stream:
        await stream.send_message(pb.SubscribeToX509BundlesRequest(), end=True)
        x509_bundles = await stream.recv_message()
        await stream.cancel()
    assert x509_bundles is not None
    assert list(x509_bundles.ca_certificates) == [f"spiffe://{TRUST_DOMAIN}"]
    roots = split_der_certificates(x509_bundles.ca_certificates[f"spiffe://{TRUST_DOMAIN}"])
    assert len(roots) >= 1  # concatenated DER, like the Workload API's bundle field
    async with admin.stub.SubscribeToJWTBundles.open(timeout=10) as stream:
        await stream.send_message(pb.SubscribeToJWTBundlesRequest(), end=True)
        jwt_bundles = await stream.recv_message()
        await stream.cancel()
    assert jwt_bundles is not None
    assert list(jwt_bundles.bundles) == [f"spiffe://{TRUST_DOMAIN}"]
    assert jwt_bundles.bundles[f"spiffe://{TRUST_DOMAIN}"].lstrip().startswith(b"{")  # JWKS


async def test_pid_without_entry_gets_one_empty_message_not_an_error(
    admin: Admin, workloads: dict[str, subprocess.Popen[bytes]]
) -> None:
    nobody = await admin.first_x509(pb.SubscribeToX509SVIDsRequest(pid=workloads["nobody"].pid))
    assert _ids(nobody) == []
    assert list(nobody.federates_with) == []


async def test_pid_of_an_exited_process_gets_one_empty_message_not_an_error(admin: Admin) -> None:
    """The unix attestor fails on a gone pid; SPIRE logs it and attests it to no selectors."""
    gone_pid = _exited_pid()
    message = await admin.first_x509(pb.SubscribeToX509SVIDsRequest(pid=gone_pid))
    assert _ids(message) == []


@pytest.mark.parametrize("pid", [True, False], ids=["selectors-and-pid", "neither"])
async def test_selectors_and_pid_together_or_neither_is_invalid_argument(
    admin: Admin, workloads: dict[str, subprocess.Popen[bytes]], pid: bool
) -> None:
    selectors = [pb.Selector(type="unix", value=f"uid:{UID_A}")] if pid else []
    request = pb.SubscribeToX509SVIDsRequest(
        pid=workloads["a"].pid if pid else 0, selectors=selectors
    )
    with pytest.raises(GRPCError) as caught:
        await admin.first_x509(request)
    assert caught.value.status is Status.INVALID_ARGUMENT
    assert caught.value.message == "must provide either selectors or non-zero PID, but not both"
    with pytest.raises(GRPCError) as jwt:
        await admin.stub.FetchJWTSVIDs(
            pb.FetchJWTSVIDsRequest(audience=["x"], pid=request.pid, selectors=selectors)
        )
    assert jwt.value.status is Status.INVALID_ARGUMENT
    assert jwt.value.message == "must provide either selectors or non-zero PID, but not both"


async def test_selectors_alone_are_taken_as_attested(admin: Admin) -> None:
    """What the API trusts a delegate with: selectors it names, no pid needed."""
    selectors = [pb.Selector(type="unix", value=f"uid:{UID_B}")]
    message = await admin.first_x509(pb.SubscribeToX509SVIDsRequest(selectors=selectors))
    assert _ids(message) == [(ENVOY_B, "")]


def _subscribe_as_caller(socket: str, pid: int) -> tuple[str, str]:
    """In a child as another uid: the status name and message SubscribeToX509SVIDs ends with."""

    async def go() -> tuple[str, str]:
        channel = Channel(path=socket)
        try:
            async with DelegatedIdentityStub(channel).SubscribeToX509SVIDs.open(timeout=10) as st:
                await st.send_message(pb.SubscribeToX509SVIDsRequest(pid=pid), end=True)
                message = await st.recv_message()
                await st.cancel()
                return ("OK", str(message))
        except GRPCError as exc:
            return (exc.status.name, str(exc.message))
        finally:
            channel.close()

    return asyncio.run(go())


async def test_callers_not_delegates_are_permission_denied(
    spire_delegated: SpireDelegated, workloads: dict[str, subprocess.Popen[bytes]]
) -> None:
    """Attested by the admin socket's peer credentials: an identity that is not a delegate,
    or none, is refused, and whom it names does not matter."""
    socket = spire_delegated.admin_socket
    # SPIRE makes the admin socket 0770 (pkg/agent/api/endpoints_posix.go): only the agent's
    # uid and group can connect. Opened up for this test only, so that another uid reaches
    # the authorization check.
    assert stat.S_IMODE(socket.stat().st_mode) == 0o770
    socket.parent.chmod(0o711)
    socket.chmod(0o777)
    registered = spire_delegated.register(UID_OUTSIDER, OUTSIDER)
    try:
        pid = workloads["a"].pid

        def refused() -> tuple[str, str]:
            return run_as(UID_OUTSIDER, _subscribe_as_caller, str(socket), pid, timeout=20)

        outcome = await asyncio.to_thread(refused)
        for _ in range(40):  # until the agent has synced the outsider's entry
            if outcome != ("PERMISSION_DENIED", "no identity issued"):
                break
            await asyncio.sleep(0.5)
            outcome = await asyncio.to_thread(refused)
        assert outcome == ("PERMISSION_DENIED", "caller not configured as an authorized delegate")
        unknown = await asyncio.to_thread(
            run_as, UID_NOBODY, _subscribe_as_caller, str(socket), pid, timeout=20
        )
        assert unknown == ("PERMISSION_DENIED", "no identity issued")
    finally:
        spire_delegated.server.entry_delete(registered)
        socket.chmod(0o770)
        socket.parent.chmod(0o700)


async def test_deleted_entry_drops_the_svid_on_the_open_stream(
    spire_delegated: SpireDelegated, admin: Admin, tmp_path: Path
) -> None:
    """The stream stays open; its next message (one agent sync later) has no SVID."""
    procs = Processes(tmp_path)
    try:
        doomed = start_as(procs, UID_DELETED, SLEEP, "doomed")
        entry = spire_delegated.register(UID_DELETED, f"spiffe://{TRUST_DOMAIN}/doomed")
        await admin.wait_x509(doomed.pid, f"spiffe://{TRUST_DOMAIN}/doomed")
        async with admin.stub.SubscribeToX509SVIDs.open(timeout=90) as stream:
            await stream.send_message(pb.SubscribeToX509SVIDsRequest(pid=doomed.pid), end=True)
            first = await asyncio.wait_for(stream.recv_message(), 10)
            assert first is not None
            assert _ids(first) == [(f"spiffe://{TRUST_DOMAIN}/doomed", "")]
            await asyncio.to_thread(spire_delegated.server.entry_delete, entry)
            loop = asyncio.get_running_loop()
            deleted_at = loop.time()
            while True:  # a rotation may come first
                message = await asyncio.wait_for(stream.recv_message(), 30)
                assert message is not None
                if not message.x509_svids:
                    break
            assert loop.time() - deleted_at < 30
            await stream.cancel()
    finally:
        procs.close()


async def test_entry_created_later_arrives_on_the_open_stream(
    spire_delegated: SpireDelegated, admin: Admin, tmp_path: Path
) -> None:
    """A pid with no entry yet: the stream stays open, and the SVID comes once the agent has
    synced the new entry."""
    procs = Processes(tmp_path)
    late_id = f"spiffe://{TRUST_DOMAIN}/late"
    entry = None
    try:
        late = start_as(procs, UID_LATE, SLEEP, "late")
        async with admin.stub.SubscribeToX509SVIDs.open(timeout=60) as stream:
            await stream.send_message(pb.SubscribeToX509SVIDsRequest(pid=late.pid), end=True)
            first = await asyncio.wait_for(stream.recv_message(), 10)
            assert first is not None
            assert _ids(first) == []
            entry = await asyncio.to_thread(spire_delegated.register, UID_LATE, late_id)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while True:  # empty messages may come first (any cache update is sent)
                left = deadline - loop.time()
                assert left > 0, "the entry never reached the open stream"
                message = await asyncio.wait_for(stream.recv_message(), left)
                assert message is not None
                if message.x509_svids:
                    break
            assert _ids(message) == [(late_id, "")]
            await stream.cancel()
    finally:
        if entry is not None:
            spire_delegated.server.entry_delete(entry)
        procs.close()


async def test_stream_outlives_the_pid_it_attested(admin: Admin, tmp_path: Path) -> None:
    """SPIRE does not watch the pid: after the workload exits, the stream stays open and
    keeps the SVID (rotations still arrive). Ending it is the delegate's duty."""
    procs = Processes(tmp_path)
    try:
        ephemeral = start_as(procs, UID_A, SLEEP, "ephemeral")
        await admin.wait_x509(ephemeral.pid, ENVOY_A)
        async with admin.stub.SubscribeToX509SVIDs.open(timeout=60) as stream:
            await stream.send_message(pb.SubscribeToX509SVIDsRequest(pid=ephemeral.pid), end=True)
            first = await asyncio.wait_for(stream.recv_message(), 10)
            assert first is not None
            assert _ids(first) == [(ENVOY_A, "a")]
            procs.stop(ephemeral)
            # SPIRE renews a 30 s SVID every 10-15 s: the next message comes from a rotation.
            after = await asyncio.wait_for(stream.recv_message(), 30)
            assert after is not None
            assert _ids(after) == [(ENVOY_A, "a")]
            await stream.cancel()
    finally:
        procs.close()


async def test_fetch_jwt_svids_by_pid(
    admin: Admin, workloads: dict[str, subprocess.Popen[bytes]]
) -> None:
    response = await admin.stub.FetchJWTSVIDs(
        pb.FetchJWTSVIDsRequest(audience=["backend"], pid=workloads["a"].pid)
    )
    (svid,) = response.svids
    assert (svid.id.trust_domain, svid.id.path, svid.hint) == (TRUST_DOMAIN, "/envoy-a", "a")
    assert svid.token.count(".") == 2
    assert svid.expires_at > svid.issued_at


async def test_fetch_jwt_svids_refusals(
    admin: Admin, workloads: dict[str, subprocess.Popen[bytes]]
) -> None:
    """Unlike SubscribeToX509SVIDs, a pid with no identity (or no process) is an error here."""
    pid = workloads["a"].pid
    gone_pid = _exited_pid()
    cases = [
        (
            pb.FetchJWTSVIDsRequest(audience=[], pid=pid),
            Status.INVALID_ARGUMENT,
            "audience must be specified",
        ),
        (
            pb.FetchJWTSVIDsRequest(audience=["x"], pid=workloads["nobody"].pid),
            Status.PERMISSION_DENIED,
            "no identity issued",
        ),
        (
            pb.FetchJWTSVIDsRequest(audience=["x"], pid=gone_pid),
            Status.PERMISSION_DENIED,
            "no identity issued",
        ),
    ]
    for request, status, text in cases:
        with pytest.raises(GRPCError) as caught:
            await admin.stub.FetchJWTSVIDs(request)
        assert (caught.value.status, caught.value.message) == (status, text)
