"""The per-caller scene: one ``sds run`` in per-caller mode, two real Envoys as two uids.

Shared by ``tests/e2e/test_per_caller.py`` (the embedded provider serves the
Delegated Identity API) and ``tests/e2e/test_per_caller_spire.py`` (a SPIRE
1.13.3 agent's admin socket does). Whoever calls :func:`start_scene` chooses
where the Delegated Identity API is (``admin_socket``), which SPIFFE IDs the
Envoys' uids are issued (:class:`Ids`) and where this process's TLS client
material comes from (``client``); the scene itself is the same:

- the bridge runs as this process's uid (root), ``--log-level DEBUG``, with
  ``per_caller: {delegated_identity_api: unix://ADMIN_SOCKET}``, a policy
  ``from-a`` admitting only Envoy A's ID, and ``allowed_uids`` root, UID_A and
  UID_B;
- its SDS socket is mode 0660 in a setgid directory of group :data:`SDS_GID`
  (mode 02750, owned by root), so the socket inherits that group; the Envoys
  hold it as their only supplementary group;
- Envoy B (uid :data:`UID_B`) has listeners ``in`` (its own ``default``),
  ``steal`` (naming A's SPIFFE ID, which B must never get) and ``from-a``
  (validated by policy ``from-a``); Envoy A (uid :data:`UID_A`) has ``in`` and a
  plaintext ``out`` forwarding over mTLS to B's ``from-a``, admitting only B.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.envoy import (
    EnvoyProcess,
    Envoys,
    bootstrap,
    downstream_mtls_listener,
    sds_cluster,
    upstream_mtls_cluster,
)
from tests.harness.procs import Processes, wait_for
from tests.harness.stack import Material
from tests.harness.tlsclient import Handshake, openssl_handshake

__all__ = [
    "LOCALHOST",
    "SDS_GID",
    "TIMEOUT",
    "UID_A",
    "UID_B",
    "Ids",
    "Node",
    "caller_ended_line",
    "kill",
    "plain_listener",
    "report_failure",
    "scene",
    "start_bridge",
    "start_envoy_a",
    "start_envoy_b",
    "start_scene",
    "uids",
]

UID_A, UID_B = 40001, 40002
SDS_GID = 40000
LOCALHOST = "127.0.0.1"
TIMEOUT = 20.0


@dataclass(frozen=True)
class Ids:
    """The SPIFFE IDs the Delegated Identity API issues: to the bridge (this process's uid,
    the delegate), to UID_A (Envoy A) and to UID_B (Envoy B)."""

    bridge: str
    envoy_a: str
    envoy_b: str


@dataclass
class Node:
    """The running scene: bridge, the two Envoys, and this process's TLS client material."""

    procs: Processes
    envoys: Envoys
    dir: Path
    ids: Ids
    bridge: Any
    admin_port: int
    client: Material
    envoy_a: EnvoyProcess
    envoy_b: EnvoyProcess

    @property
    def sds_socket(self) -> Path:
        return self.dir / "sds" / "sds.sock"

    def admin_text(self, path: str) -> str:
        """The body of a GET on the bridge's admin endpoint, whatever its status."""
        url = f"http://{LOCALHOST}:{self.admin_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())
        except urllib.error.HTTPError as exc:
            return str(exc.read().decode())

    def admin(self, path: str) -> Any:
        return json.loads(self.admin_text(path))

    def caller(self, pid: int) -> dict[str, Any] | None:
        """The bridge's ``/callers`` entry for process ``pid``, if attested now."""
        return next((c for c in self.admin("/callers") if c["pid"] == pid), None)

    def attested_as(self, envoy: EnvoyProcess, spiffe_id: str) -> dict[str, Any] | None:
        """``envoy``'s ``/callers`` entry once its SPIFFE IDs are exactly ``[spiffe_id]``."""
        caller = self.caller(envoy.pid)
        return caller if caller is not None and caller["spiffe_ids"] == [spiffe_id] else None

    def streams_of(self, pid: int) -> list[dict[str, Any]]:
        """The bridge's ``/envoys`` entries (one per SDS stream) opened by process ``pid``."""
        return [s for s in self.admin("/envoys") if s["pid"] == pid]

    def metric(self, name: str, labels: str = "") -> float | None:
        """One sample of the bridge's ``/metrics``, by name and exact label text."""
        wanted = name + (f"{{{labels}}}" if labels else "")
        for line in self.admin_text("/metrics").splitlines():
            sample, _, value = line.rpartition(" ")
            if sample == wanted:
                return float(value)
        return None

    def handshake(self, envoy: EnvoyProcess, listener: str = "in") -> Handshake:
        """``openssl s_client`` (as root, with :attr:`client`) to ``envoy``'s listener."""
        c = self.client
        return openssl_handshake(LOCALHOST, envoy.listener_port(listener), c.cert, c.key, c.ca)

    def bridge_log(self) -> str:
        return self.procs.log(self.bridge)

    def restart_envoy_a(self) -> EnvoyProcess:
        """A new Envoy A in place of the old one (which must be gone)."""
        self.envoy_a = start_envoy_a(self.envoys, self.sds_socket, self.envoy_b, self.ids)
        return self.envoy_a

    def logs(self) -> str:
        """The tails of every process's log (bridge, provider if any) and of the Envoys'."""
        return self.procs.tails(6000) + self.envoys.dump_logs(4000)


def start_envoy_a(
    envoys: Envoys, sds_socket: Path, envoy_b: EnvoyProcess, ids: Ids
) -> EnvoyProcess:
    """Envoy A (uid UID_A): listener ``in``; ``out`` forwards over mTLS to B's ``from-a``."""
    clusters = [
        sds_cluster("sds", sds_socket),
        upstream_mtls_cluster(
            "to-b", envoy_b.listener_port("from-a"), allowed_peer_ids=[ids.envoy_b]
        ),
    ]
    listeners = [downstream_mtls_listener("in"), plain_listener("out", "to-b")]
    config = bootstrap("envoy-a", "per-caller", listeners, clusters)
    return envoys.start(config, uid=UID_A, groups=[SDS_GID], name="envoy-a", ready_timeout=TIMEOUT)


def start_envoy_b(envoys: Envoys, sds_socket: Path, ids: Ids) -> EnvoyProcess:
    """Envoy B (uid UID_B): ``in``; ``steal`` naming A's ID; ``from-a`` admitting only A."""
    listeners = [
        downstream_mtls_listener("in"),
        # B is not entitled to A's SPIFFE ID, so that secret never arrives; the initial
        # fetch timeout lets B go LIVE without it.
        downstream_mtls_listener("steal", cert_sds_name=ids.envoy_a, initial_fetch_timeout="1s"),
        downstream_mtls_listener("from-a", validation_sds_name="from-a"),
    ]
    config = bootstrap("envoy-b", "per-caller", listeners, [sds_cluster("sds", sds_socket)])
    return envoys.start(config, uid=UID_B, groups=[SDS_GID], name="envoy-b", ready_timeout=TIMEOUT)


def plain_listener(name: str, cluster: str) -> dict[str, Any]:
    """A plaintext HTTP listener on loopback routing everything to ``cluster``."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {
            "name": f"{name}-routes",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": LOCALHOST, "port_value": 0}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def start_bridge(
    procs: Processes, directory: Path, admin_socket: Path, ids: Ids
) -> tuple[Any, int]:
    """``sds run`` in per-caller mode on ``admin_socket``; the process and its admin port."""
    sds_dir = directory / "sds"
    sds_dir.mkdir()
    os.chown(sds_dir, 0, SDS_GID)
    sds_dir.chmod(0o2750)  # setgid: the socket bound here gets group SDS_GID
    config = directory / "bridge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": f"unix://{sds_dir / 'sds.sock'}",
                "socket_mode": "0660",
                "allowed_uids": [0, UID_A, UID_B],
                "admin": f"{LOCALHOST}:0",
                "per_caller": {"delegated_identity_api": f"unix://{admin_socket}"},
                "policies": [{"name": "from-a", "allow": [ids.envoy_a]}],
            }
        )
    )
    bridge = procs.sds("--log-level", "DEBUG", "run", "--config", str(config), name="bridge")
    socket = sds_dir / "sds.sock"
    wait_for(socket.exists, TIMEOUT, "the bridge's SDS socket")
    assert socket.stat().st_gid == SDS_GID
    assert oct(socket.stat().st_mode & 0o777) == "0o660"

    def admin_port() -> int | None:
        match = re.search(r"admin\.listening \S*?:(\d+)", procs.log(bridge))
        return int(match.group(1)) if match else None

    return bridge, wait_for(admin_port, TIMEOUT, "the bridge's admin port in its log")


def start_scene(
    procs: Processes,
    envoys: Envoys,
    directory: Path,
    admin_socket: Path,
    *,
    ids: Ids,
    client: Callable[[], Material],
) -> Node:
    """Bridge, Envoy B, then Envoy A (which needs B's port); then ``client()``'s material."""
    bridge, admin_port = start_bridge(procs, directory, admin_socket, ids)
    sds_socket = directory / "sds" / "sds.sock"
    envoy_b = start_envoy_b(envoys, sds_socket, ids)
    envoy_a = start_envoy_a(envoys, sds_socket, envoy_b, ids)
    return Node(procs, envoys, directory, ids, bridge, admin_port, client(), envoy_a, envoy_b)


@contextlib.contextmanager
def scene(
    tmp_path_factory: pytest.TempPathFactory, start: Callable[[Processes, Envoys], Node]
) -> Iterator[Node]:
    """The scene ``start`` builds with fresh process and Envoy managers; every process it
    started is stopped after (and its logs printed if it could not be built)."""
    procs = Processes(tmp_path_factory.mktemp("per-caller-logs"))
    envoys = Envoys(tmp_path_factory.mktemp("per-caller-envoys"))
    try:
        try:
            node = start(procs, envoys)
        except BaseException:
            sys.stderr.write("\n" + procs.tails(6000) + envoys.dump_logs(4000) + "\n")
            raise
        yield node
    finally:
        envoys.close()
        procs.close()


def report_failure(node: Node, request: pytest.FixtureRequest, extra: str = "") -> None:
    """If the test ``request`` belongs to failed, print the scene's log tails (and ``extra``)."""
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        sys.stderr.write("\n" + node.logs() + extra + "\n")


def uids(pid: int) -> list[str]:
    """The real, effective, saved and filesystem uids of ``pid`` (``/proc/PID/status``)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))


def caller_ended_line(node: Node, pid: int) -> str | None:
    """The bridge's ``caller.ended`` log line for ``pid``, once there is one."""
    for line in node.bridge_log().splitlines():
        if "caller.ended" in line and f"pid={pid} " in line:
            return line
    return None


def kill(envoy: EnvoyProcess) -> int:
    """SIGKILL ``envoy`` and wait until it is gone; its pid."""
    pid = envoy.pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not envoy.alive(), TIMEOUT, f"{envoy.name} dead")
    return pid
