"""Per-caller mode end to end: one node bridge, two real Envoys as two uids, each its own SVID.

One module-wide scene, without SPIRE: the embedded provider (``sds
workload-api``) serves the Workload API and, on a second socket, the Delegated
Identity API, with this test process's uid (root, so the bridge it starts) as
the only authorized delegate; one ``sds run`` in per-caller mode subscribes on
its callers' behalf; Envoy A runs as uid 40001 and Envoy B as uid 40002 (both
Envoy 1.40 from the harness, via ``setpriv``). The provider's rules give each
uid one identity: root is ``sds-bridge``, 40001 ``envoy-a``, 40002
``envoy-b``. The scene is :mod:`tests.harness.per_caller`'s (shared with the
same checks against SPIRE, ``tests/e2e/test_per_caller_spire.py``).

The SDS socket is mode 0660 in a setgid directory of group 40000 (mode
02750, owned by root), so the socket inherits group 40000; the Envoys hold
that group as their only supplementary group, and the bridge's
``allowed_uids`` admits exactly root and the two Envoy uids. TLS clients use
the SVID the provider issues to this process (``sds-bridge``), which every
listener's ``ROOTCA`` trusts.

Checked: each Envoy presents its own SVID, never the bridge's; B naming A's
SPIFFE ID never receives it; ``/envoys``, ``/callers`` and the metrics name
each stream's workload; A reaches B over mTLS each as itself, under a policy
admitting only A; a uid outside ``allowed_uids`` is refused; killing A ends
only A's caller, and a new A is attested afresh. The last test restarts A,
so the module's scene is whole again for any test after it.
"""

from __future__ import annotations

import asyncio
import http.client
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from sds.spiffe.x509 import X509Context
from sds.workloadapi.client import WorkloadApiClient
from tests.conftest import short_tmp
from tests.harness.envoy import Envoys, bootstrap, downstream_mtls_listener, sds_cluster
from tests.harness.per_caller import (
    LOCALHOST,
    SDS_GID,
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
from tests.harness.procs import Processes, wait_for
from tests.harness.provider import start_provider, write_identities
from tests.harness.stack import Material

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(os.geteuid() != 0, reason="running Envoys as other uids needs root"),
]

TD = "spiffe://example.org"
BRIDGE = f"{TD}/sds-bridge"
ENVOY_A = f"{TD}/envoy-a"
ENVOY_B = f"{TD}/envoy-b"
IDS = Ids(bridge=BRIDGE, envoy_a=ENVOY_A, envoy_b=ENVOY_B)
UID_OUTSIDER = 40003  # holds the socket's group, not in allowed_uids, has no identity


def _identity(name: str, uid: int) -> str:
    return (
        f"kind: workload_identity\nversion: v1\nmetadata: {{name: {name}}}\n"
        f"spec:\n  spiffe: {{id: /{name}, hint: {name}}}\n"
        "  rules: {allow: [{conditions: [{attribute: workload.unix.uid, "
        f"eq: {{value: {uid}}}}}]}}]}}\n"
    )


IDENTITIES = "---\n".join(
    _identity(name, uid)
    for name, uid in (("sds-bridge", 0), ("envoy-a", UID_A), ("envoy-b", UID_B))
)


def _client_material(workload_socket: Path) -> Material:
    """The SVID the provider issues to this process (``sds-bridge``), with its trust bundle."""

    async def fetch() -> X509Context:
        async with WorkloadApiClient(f"unix://{workload_socket}") as client:
            return await client.fetch_x509_context()

    context = asyncio.run(fetch())
    svid = context.default_svid
    assert svid is not None and str(svid.spiffe_id) == BRIDGE
    bundle = context.bundles[svid.spiffe_id.trust_domain]
    return Material(svid.chain_pem(), svid.key_pem(), bundle.pem(), BRIDGE)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with (
        short_tmp("sds-pc-", 0o755) as directory,
        scene(tmp_path_factory, partial(_start_scene, directory=directory)) as built,
    ):
        yield built


def _start_scene(procs: Processes, envoys: Envoys, directory: Path) -> Node:
    """The provider (Workload API and Delegated Identity API), then the scene on it."""
    (directory / "workload").mkdir(mode=0o755)
    (directory / "admin").mkdir(mode=0o700)
    workload_socket = directory / "workload" / "workload.sock"
    admin_socket = directory / "admin" / "admin.sock"
    ids = write_identities(directory, IDENTITIES)
    delegate = ("--admin-socket", str(admin_socket), "--authorized-delegate", BRIDGE)
    provider = start_provider(procs, workload_socket, ids, "--ephemeral", *delegate)
    wait_for(lambda: "provider.admin_ready" in procs.log(provider), TIMEOUT, "admin API")
    client = partial(_client_material, workload_socket)
    return start_scene(procs, envoys, directory, admin_socket, ids=IDS, client=client)


@pytest.fixture(autouse=True)
def _logs_on_failure(node: Node, request: pytest.FixtureRequest) -> Iterator[None]:
    """A failed test prints the tails of the provider's, the bridge's and the Envoys' logs."""
    yield
    report_failure(node, request)


def test_each_envoy_presents_its_own_svid_never_the_bridges(node: Node) -> None:
    assert uids(node.envoy_a.pid) == [str(UID_A)] * 4
    assert uids(node.envoy_b.pid) == [str(UID_B)] * 4
    for envoy, expected in ((node.envoy_a, ENVOY_A), (node.envoy_b, ENVOY_B)):
        shake = node.handshake(envoy)
        assert shake.ok and shake.verified, shake.output[-2000:]
        assert shake.spiffe_id == expected
        assert shake.http_status == 200
        caller = wait_for(partial(node.caller, envoy.pid), TIMEOUT, f"{envoy.name} attested")
        assert caller["spiffe_ids"] == [expected]
        assert caller["uid"] == (UID_A if envoy is node.envoy_a else UID_B)
        assert {"default", "ROOTCA", expected} <= set(caller["secrets"])
        assert BRIDGE not in caller["secrets"]
        # What Envoy itself holds: its own default and the bundle, nothing of the bridge's.
        assert {"default", "ROOTCA"} <= set(envoy.secrets())
    assert not any(c["spiffe_ids"] == [BRIDGE] for c in node.admin("/callers"))


def test_a_caller_naming_another_workloads_id_never_gets_it(node: Node) -> None:
    b = node.envoy_b
    caller = wait_for(lambda: node.caller(b.pid), TIMEOUT, "Envoy B attested")
    assert ENVOY_A not in caller["secrets"]
    asking = [s for s in node.streams_of(b.pid) if ENVOY_A in s["names"]]
    assert asking, node.streams_of(b.pid)  # B did ask for it...
    assert all(ENVOY_A not in s["acked"] for s in asking)  # ...and was never sent it
    assert ENVOY_A in b.warming_secrets()
    assert ENVOY_A not in b.secrets()
    # A listener whose certificate never came cannot complete a handshake.
    refused = node.handshake(b, "steal")
    assert not refused.ok
    assert refused.spiffe_id is None
    # Its other listener serves its own SVID all the while.
    assert node.handshake(b).spiffe_id == ENVOY_B


def test_bridge_admin_and_metrics_show_each_stream_attested(node: Node) -> None:
    def two_callers() -> bool:
        return node.metric("sds_callers") == 2.0

    wait_for(two_callers, TIMEOUT, "sds_callers 2")
    streams = node.admin("/envoys")
    assert streams
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
    assert callers[node.envoy_a.pid]["streams"] == by_workload[ENVOY_A]
    assert callers[node.envoy_b.pid]["streams"] == by_workload[ENVOY_B]


def test_mtls_between_the_two_envoys_each_as_itself(node: Node) -> None:
    # A's plaintext "out" listener forwards over mTLS to B's "from-a", which admits only
    # envoy-a (policy "from-a") and answers with the identities of both ends.
    status, headers, body = _get(node.envoy_a.listener_port("out"))
    assert status == 200, body
    assert body == b"hello from app"
    assert headers["x-peer-uri-san"] == ENVOY_A
    assert headers["x-local-uri-san"] == ENVOY_B
    # This process's sds-bridge SVID is trusted by ROOTCA but not admitted by the policy.
    assert not node.handshake(node.envoy_b, "from-a").ok


def _get(port: int) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP GET / to loopback ``port``: status, headers (lower-case names), body."""
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=5)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def test_a_uid_outside_allowed_uids_is_refused_before_attestation(node: Node) -> None:
    # The socket's group lets uid 40003 connect; allowed_uids refuses it on every stream,
    # before any subscription is made on its behalf.
    denied = node.metric("sds_denied_total") or 0.0
    listeners = [downstream_mtls_listener("in")]
    config = bootstrap("outsider", "per-caller", listeners, [sds_cluster("sds", node.sds_socket)])
    outsider = node.envoys.start(
        config, uid=UID_OUTSIDER, groups=[SDS_GID], name="outsider", ready=False
    )
    try:
        who = f"uid={UID_OUTSIDER} gid={UID_OUTSIDER} pid={outsider.pid}"

        def refused_in_bridge_log() -> bool:
            return any(
                "sds.denied" in line and who in line
                for line in node.procs.log(node.bridge).splitlines()
            )

        wait_for(refused_in_bridge_log, TIMEOUT, "sds.denied for the outsider")
        wait_for(lambda: "not allowed to fetch secrets" in outsider.log_text(), TIMEOUT, "denial")
        assert (node.metric("sds_denied_total") or 0.0) > denied
        assert node.caller(outsider.pid) is None
        assert node.streams_of(outsider.pid) == []
        assert {"default", "ROOTCA"} <= set(outsider.warming_secrets())
        assert outsider.secrets() == {}
        assert not outsider.is_ready()
    finally:
        outsider.stop()


def test_killing_an_envoy_ends_only_its_caller(node: Node) -> None:
    a, b = node.envoy_a, node.envoy_b
    wait_for(lambda: node.caller(a.pid), TIMEOUT, "Envoy A attested")
    b_before = wait_for(lambda: node.caller(b.pid), TIMEOUT, "Envoy B attested")
    a_pid = kill(a)

    line = wait_for(partial(caller_ended_line, node, a_pid), TIMEOUT, "caller.ended for Envoy A")
    assert f"workload={ENVOY_A}" in line
    # The kernel closes a dying process's sockets before its pidfd turns readable, so the
    # bridge may see either first; both end the caller at once.
    reasons = (f"the attested process (pid {a_pid}) exited", "its last SDS stream closed")
    assert any(f'reason="{reason}"' in line for reason in reasons), line
    wait_for(lambda: node.caller(a_pid) is None, TIMEOUT, "Envoy A gone from /callers")
    wait_for(lambda: node.metric("sds_callers") == 1.0, TIMEOUT, "sds_callers 1")
    assert node.metric("sds_caller_streams", f'workload="{ENVOY_A}"') is None
    wait_for(lambda: node.streams_of(a_pid) == [], TIMEOUT, "A's streams gone from /envoys")

    # B is untouched: same attested process, same streams, still serving its own SVID.
    b_after = node.caller(b.pid)
    assert b_after is not None
    assert b_after["streams"] == b_before["streams"]
    assert b_after["spiffe_ids"] == [ENVOY_B]
    assert b.alive()
    assert node.handshake(b).spiffe_id == ENVOY_B

    # A new Envoy as uid 40001 is attested afresh and gets envoy-a again.
    again = node.restart_envoy_a()
    assert again.pid != a_pid
    assert node.handshake(again).spiffe_id == ENVOY_A
    assert wait_for(partial(node.caller, again.pid), TIMEOUT, "new A")["spiffe_ids"] == [ENVOY_A]
