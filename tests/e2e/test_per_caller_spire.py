"""Per-caller mode against a real SPIRE 1.13.3 agent: two real Envoys, each its own SVID.

The scene of ``tests/e2e/test_per_caller.py`` (:mod:`tests.harness.per_caller`),
with the session's delegated agent (:class:`tests.harness.spire.SpireDelegated`)
in place of the embedded provider: the one per-caller bridge subscribes on its
callers' behalf on that agent's admin socket, where this process's uid (root,
so the bridge) is the authorized delegate ``sds-bridge``. This module registers
uid 40001 as :data:`ENVOY_A` and uid 40002 as :data:`ENVOY_B` on that agent
(IDs nobody else in the session registers) and deletes both entries at the
end. TLS clients use an SVID minted by the SPIRE server (``x509 mint``), which
every listener's ``ROOTCA`` (the agent's bundle) trusts.

SPIRE's behaviour the checks rest on (pinned in
``tests/integration/test_spire_delegated.py``): the delegate's own pid is
handed the delegate's SVID, so a root caller would be too, were the bridge not
withholding it; a deleted entry drops the SVID from the open stream's next
message, one agent sync (a few seconds) later; and SPIRE does not end a stream
when the pid it attested exits, so the bridge must, or a later process reusing
the pid would inherit the subscription. The agent's SVIDs last 40 s (30 s TTL
plus SPIRE's 10 s backdating) and are renewed every 10-15 s.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from grpclib.client import Channel

from sds._proto import delegatedidentity_pb2 as pb
from sds._proto.delegatedidentity_grpc import DelegatedIdentityStub
from tests.conftest import short_tmp
from tests.harness.clientloop import ClientLoop
from tests.harness.envoy import bootstrap, downstream_mtls_listener, sds_cluster
from tests.harness.per_caller import (
    TIMEOUT,
    UID_A,
    UID_B,
    Ids,
    Node,
    caller_ended_line,
    kill,
    report_failure,
    scene,
    start_scene,
    uids,
)
from tests.harness.procs import wait_for
from tests.harness.spire import BRIDGE, TRUST_DOMAIN, SpireDelegated
from tests.harness.tlsclient import Handshake, HttpsClient

pytestmark = [
    pytest.mark.spire,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="running Envoys as other uids needs root"),
]

TD = f"spiffe://{TRUST_DOMAIN}"
ENVOY_A = f"{TD}/per-caller/envoy-a"
ENVOY_B = f"{TD}/per-caller/envoy-b"
CLIENT = f"{TD}/per-caller/client"
IDS = Ids(bridge=BRIDGE, envoy_a=ENVOY_A, envoy_b=ENVOY_B)
SYNC_TIMEOUT = 30.0  # an agent sync (entries created or deleted) takes a few seconds


class Scene:
    """The module's node, the delegated agent it runs on, and the entries it registered."""

    def __init__(self, node: Node, spire: SpireDelegated, entries: dict[str, str]) -> None:
        self.node = node
        self.spire = spire
        self.entries = entries  # SPIFFE ID -> entry id


def _issued_to_uid(admin_socket: Path, uid: int) -> list[str]:
    """The SPIFFE IDs the agent would issue to processes of ``uid`` now (selectors alone
    are taken as attested by the Delegated Identity API)."""

    async def first() -> list[str]:
        channel = Channel(path=str(admin_socket))
        try:
            stub = DelegatedIdentityStub(channel)
            async with stub.SubscribeToX509SVIDs.open(timeout=10) as stream:
                selector = pb.Selector(type="unix", value=f"uid:{uid}")
                await stream.send_message(
                    pb.SubscribeToX509SVIDsRequest(selectors=[selector]), end=True
                )
                message = await stream.recv_message()
                await stream.cancel()
        finally:
            channel.close()
        assert message is not None
        return [
            f"spiffe://{s.x509_svid.id.trust_domain}{s.x509_svid.id.path}"
            for s in message.x509_svids
        ]

    return asyncio.run(first())


def _register(spire: SpireDelegated, uid: int, spiffe_id: str) -> str:
    """Register ``spiffe_id`` for ``uid`` and wait until the agent issues exactly it."""
    entry = spire.register(uid, spiffe_id)
    wait_for(
        lambda: _issued_to_uid(spire.admin_socket, uid) == [spiffe_id],
        SYNC_TIMEOUT,
        f"the agent to issue only {spiffe_id} to uid {uid}",
    )
    return entry


@pytest.fixture(scope="module")
def spire_scene(
    spire_delegated: SpireDelegated, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scene]:
    """Both entries synced, then the bridge and the Envoys; the entries deleted after."""
    entries: dict[str, str] = {}
    try:
        entries[ENVOY_A] = _register(spire_delegated, UID_A, ENVOY_A)
        entries[ENVOY_B] = _register(spire_delegated, UID_B, ENVOY_B)
        with short_tmp("sds-pcs-", 0o755) as directory:
            start = partial(
                start_scene,
                directory=directory,
                admin_socket=spire_delegated.admin_socket,
                ids=IDS,
                client=partial(spire_delegated.server.mint, CLIENT),
            )
            with scene(tmp_path_factory, start) as node:
                yield Scene(node, spire_delegated, entries)
    finally:
        for entry in entries.values():
            spire_delegated.server.entry_delete(entry)


@pytest.fixture
def node(spire_scene: Scene) -> Node:
    return spire_scene.node


@pytest.fixture(autouse=True)
def _logs_on_failure(
    spire_scene: Scene, spire_logs_on_failure: None, request: pytest.FixtureRequest
) -> Iterator[None]:
    """A failed test prints the tails of the bridge's, the Envoys' and the SPIRE logs."""
    yield
    agent = spire_scene.spire.agent
    report_failure(spire_scene.node, request, f"\n----- {agent.name} -----\n{agent.log()[-6000:]}")


def test_each_envoy_presents_its_own_svid_never_the_bridges(node: Node) -> None:
    assert uids(node.envoy_a.pid) == [str(UID_A)] * 4
    assert uids(node.envoy_b.pid) == [str(UID_B)] * 4
    for envoy, expected in ((node.envoy_a, ENVOY_A), (node.envoy_b, ENVOY_B)):
        caller = wait_for(partial(node.attested_as, envoy, expected), TIMEOUT, envoy.name)
        assert caller["uid"] == (UID_A if envoy is node.envoy_a else UID_B)
        assert {"default", "ROOTCA", expected} <= set(caller["secrets"])
        assert BRIDGE not in caller["secrets"]
        shake = node.handshake(envoy)
        assert shake.ok and shake.verified, shake.output[-2000:]
        assert shake.spiffe_id == expected
        assert shake.http_status == 200
        assert {"default", "ROOTCA"} <= set(envoy.secrets())
    assert not any(BRIDGE in c["spiffe_ids"] for c in node.admin("/callers"))


def test_a_root_caller_is_not_handed_the_bridges_identity(node: Node) -> None:
    """SPIRE attests a root Envoy like the bridge itself (uid 0 is sds-bridge): the bridge
    withholds that SVID, so the caller is attested with no identity at all."""
    listeners = [downstream_mtls_listener("in")]
    config = bootstrap("root", "per-caller", listeners, [sds_cluster("sds", node.sds_socket)])
    root = node.envoys.start(config, name="root-envoy", ready=False)
    try:
        assert uids(root.pid) == ["0"] * 4

        def withheld() -> str | None:
            return next(
                (
                    line
                    for line in node.bridge_log().splitlines()
                    if "caller.withheld" in line and f"pid={root.pid} " in line
                ),
                None,
            )

        line = wait_for(withheld, TIMEOUT, "caller.withheld for the root Envoy")
        assert f"spiffe_ids={BRIDGE}" in line
        caller = wait_for(lambda: node.caller(root.pid), TIMEOUT, "the root Envoy attested")
        assert caller["spiffe_ids"] == []
        assert BRIDGE not in caller["secrets"]
        assert "default" not in caller["secrets"]
        assert "default" not in root.secrets()
        assert not root.is_ready()
    finally:
        root.stop()


def test_a_caller_naming_another_workloads_id_never_gets_it(node: Node) -> None:
    b = node.envoy_b
    caller = wait_for(partial(node.attested_as, b, ENVOY_B), TIMEOUT, "Envoy B attested")
    assert ENVOY_A not in caller["secrets"]
    asking = [s for s in node.streams_of(b.pid) if ENVOY_A in s["names"]]
    assert asking, node.streams_of(b.pid)  # B did ask for it...
    assert all(ENVOY_A not in s["acked"] for s in asking)  # ...and was never sent it
    assert ENVOY_A in b.warming_secrets()
    assert ENVOY_A not in b.secrets()
    refused = node.handshake(b, "steal")
    assert not refused.ok
    assert refused.spiffe_id is None
    assert node.handshake(b).spiffe_id == ENVOY_B


def test_bridge_admin_and_metrics_show_each_stream_attested(node: Node) -> None:
    wait_for(lambda: node.metric("sds_callers") == 2.0, TIMEOUT, "sds_callers 2")
    streams = node.admin("/envoys")
    by_workload: dict[str, int] = {}
    for stream in streams:
        expected = {node.envoy_a.pid: ENVOY_A, node.envoy_b.pid: ENVOY_B}[stream["pid"]]
        assert stream["workload"] == expected
        assert stream["uid"] == (UID_A if expected == ENVOY_A else UID_B)
        by_workload[expected] = by_workload.get(expected, 0) + 1
    assert set(by_workload) == {ENVOY_A, ENVOY_B}
    for workload, count in by_workload.items():
        assert node.metric("sds_caller_streams", f'workload="{workload}"') == float(count)
    callers = {c["pid"]: c for c in node.admin("/callers")}
    assert set(callers) == {node.envoy_a.pid, node.envoy_b.pid}
    assert callers[node.envoy_a.pid]["spiffe_ids"] == [ENVOY_A]
    assert callers[node.envoy_b.pid]["spiffe_ids"] == [ENVOY_B]
    assert callers[node.envoy_a.pid]["streams"] == by_workload[ENVOY_A]
    assert callers[node.envoy_b.pid]["streams"] == by_workload[ENVOY_B]


def test_a_rotation_reaches_envoy_a_without_failed_handshakes(node: Node) -> None:
    """SPIRE renews the 40 s SVID every 10-15 s; Envoy A presents the new one."""
    c = node.client
    loop = ClientLoop(HttpsClient(c.ca, c.cert, c.key), node.envoy_a.listener_port("in")).start()
    try:
        first = wait_for(lambda: loop.serials, TIMEOUT, "a first handshake")[0]
        wait_for(lambda: loop.serials[-1] != first, 45, "a rotated SVID at Envoy A")
    finally:
        loop.stop()
    assert loop.failures == []
    assert loop.ok > 20
    shake = node.handshake(node.envoy_a)
    assert shake.spiffe_id == ENVOY_A
    assert shake.serial != first


def _admin_connections(bridge_pid: int, admin_socket: Path) -> int:
    """How many connections ``bridge_pid`` holds to the agent's admin socket, from
    ``ss``: the agent's accepted ends carry the socket's path, the bridge's own ends are
    their peers (matched by inode against the bridge's file descriptors)."""
    mine = set()
    fd_dir = Path(f"/proc/{bridge_pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            mine.add(target[len("socket:[") : -1])
    out = subprocess.run(
        ["ss", "-H", "-x", "-n"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    count = 0
    for line in out.splitlines():
        fields = line.split()
        # Netid State Recv-Q Send-Q Local-Address Port Peer-Address Port
        if len(fields) >= 8 and fields[4] == str(admin_socket) and fields[7] in mine:
            count += 1
    return count


def test_a_killed_envoys_subscription_ends_and_its_pid_is_attested_afresh(
    node: Node, spire_scene: Scene
) -> None:
    """SPIRE keeps a dead pid's stream open: the bridge closes it when the process exits
    (its connection to the admin socket goes), and a new Envoy A is attested anew."""
    a, b = node.envoy_a, node.envoy_b
    wait_for(partial(node.attested_as, a, ENVOY_A), TIMEOUT, "Envoy A attested")
    b_before = wait_for(partial(node.attested_as, b, ENVOY_B), TIMEOUT, "Envoy B attested")
    admin_socket = spire_scene.spire.admin_socket
    bridge_pid = node.bridge.pid
    held = _admin_connections(bridge_pid, admin_socket)
    # The bundle watch, the bridge's own identity, one subscription per caller (A, B).
    assert held >= 4, held

    a_pid = kill(a)
    line = wait_for(partial(caller_ended_line, node, a_pid), TIMEOUT, "caller.ended for A")
    assert f"workload={ENVOY_A}" in line
    wait_for(lambda: node.caller(a_pid) is None, TIMEOUT, "Envoy A gone from /callers")
    wait_for(
        lambda: _admin_connections(bridge_pid, admin_socket) == held - 1,
        TIMEOUT,
        "the bridge to close A's subscription to the agent",
    )
    wait_for(lambda: node.metric("sds_callers") == 1.0, TIMEOUT, "sds_callers 1")
    assert node.metric("sds_caller_streams", f'workload="{ENVOY_A}"') is None

    b_after = node.caller(b.pid)
    assert b_after is not None
    assert b_after["streams"] == b_before["streams"]
    assert b_after["spiffe_ids"] == [ENVOY_B]
    assert node.handshake(b).spiffe_id == ENVOY_B

    again = node.restart_envoy_a()
    assert again.pid != a_pid
    assert wait_for(partial(node.attested_as, again, ENVOY_A), TIMEOUT, "new A")["uid"] == UID_A
    assert node.handshake(again).spiffe_id == ENVOY_A
    wait_for(
        lambda: _admin_connections(bridge_pid, admin_socket) == held,
        TIMEOUT,
        "a subscription for the new Envoy A",
    )


def test_a_deleted_entry_takes_the_workloads_svid_away(node: Node, spire_scene: Scene) -> None:
    """Last in the module: B's entry is deleted and B loses its SVID; re-registered, it is back.

    The bridge withdraws B's secrets at once, but SDS cannot take a secret back from
    Envoy: B keeps presenting the last SVID it was sent, no rotation reaches it any more,
    and once that SVID expires (40 s at most here) every handshake to B fails.
    """
    b = node.envoy_b
    wait_for(partial(node.attested_as, b, ENVOY_B), TIMEOUT, "Envoy B attested")
    spire = spire_scene.spire
    spire.server.entry_delete(spire_scene.entries.pop(ENVOY_B))

    def lost() -> bool:
        caller = node.caller(b.pid)
        return caller is not None and caller["spiffe_ids"] == []

    wait_for(lost, SYNC_TIMEOUT, "Envoy B's caller without SPIFFE IDs")
    caller = node.caller(b.pid)
    assert caller is not None
    assert caller["secrets"] == []
    assert caller["ready"] is False
    assert "the Workload API holds no X.509-SVID for this workload" in caller["reason"]
    last = node.handshake(b)
    assert last.ok and last.spiffe_id == ENVOY_B and last.leaf is not None
    expires = last.leaf.not_valid_after_utc.timestamp()

    def refused() -> Handshake | None:
        shake = node.handshake(b)
        if shake.ok:
            assert shake.serial == last.serial  # the last SVID sent, never a new one
            return None
        return shake

    left = expires - time.time()
    assert left < 45, left
    failed = wait_for(refused, max(left, 0) + TIMEOUT, "handshakes to B to fail")
    assert "certificate has expired" in failed.output, failed.output[-2000:]
    assert time.time() >= expires
    # A is untouched.
    assert node.handshake(node.envoy_a).spiffe_id == ENVOY_A

    spire_scene.entries[ENVOY_B] = spire.register(UID_B, ENVOY_B)
    wait_for(partial(node.attested_as, b, ENVOY_B), SYNC_TIMEOUT, "Envoy B re-registered")

    def serving_again() -> bool:
        shake = node.handshake(b)
        return shake.ok and shake.spiffe_id == ENVOY_B and shake.serial != last.serial

    wait_for(serving_again, TIMEOUT, "B serving a new SVID")
