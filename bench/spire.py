"""SPIRE's own SDS against ``sds run`` fed by the same SPIRE agent: rotation and fan-out.

Usage: ``.venv/bin/python bench/spire.py [--quick] [--rotations N] [--streams N]
[--fanout-rotations R] [--skip-fanout]``

One spire-server and one spire-agent v1.13.3 (built once by ``tests/harness/gotools.py``;
sqlite, join token, unix attestor, ``default_x509_svid_ttl = "30s"``: the agent
renews the bridge's SVID every 10-15 s, on its own schedule). The workload
identity ``spiffe://example.org/web`` is issued to this uid.

**Rotation.** Two identical Envoys 1.40 (``downstream_mtls_listener``,
``default`` + ``ROOTCA`` over SDS, one worker): *spire* gets its secrets from
the agent's own SDS (on the Workload API socket), *bridge* from ``sds run``
(INFO logging, admin on) whose upstream is the same agent. An independent
Workload API watcher in this process (its own stream to the agent) is T0: the
moment it receives the renewed SVID. Then fresh mTLS handshakes (Python ssl,
no resumption) alternate between the two Envoys until each presents the new
leaf: T1 per Envoy. The Envoy probed first alternates every rotation (both
orders), so the one-handshake sampling delay hits both alike.

**Fan-out.** For each server in turn (the agent's SDS, then the bridge's):
N (default 1,000) StreamSecrets streams from 2 load-client processes
(``bench/_loadclient.py``: one connection per stream, asks for ``default``,
ACKs every response). Per rotation: the clients are armed with the current
leaf's PEM in "absent" mode; T0 is the watcher seeing the renewal; each
stream records when a response without the old leaf arrived. Server CPU per
rotation is read from ``/proc`` (from arming to idle: for the agent this
includes renewing its SVID with the server; for the bridge, its Watcher).
VmRSS is read with all streams open.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    BENCH,
    CLK_TCK,
    PYTHON,
    Prober,
    Procs,
    cpu_ticks,
    machine,
    machine_line,
    ratio,
    read_line,
    rss_kb,
    run_benchmark,
    send_line,
    summary,
    table,
    verdict,
    wait_idle,
    wait_until,
    workspace,
)
from cryptography.hazmat.primitives import serialization
from rotation import profile_top

from sds.workloadapi.client import WorkloadApiClient
from tests.harness.envoy import Envoys, bootstrap, downstream_mtls_listener, sds_cluster
from tests.harness.procs import Processes
from tests.harness.spire import (
    SPIRE_VERSION,
    TRUST_DOMAIN,
    SpireAgent,
    SpireServer,
    own_uid_selector,
    spire_binaries,
)

WEB = f"spiffe://{TRUST_DOMAIN}/web"
WARMUP = 2
CLIENTS = 2
TARGET_RATIO = 1.1


@dataclass
class Rotation:
    """One renewal seen by the independent watcher."""

    t0: float
    serial: int
    leaf_der: bytes
    leaf_pem: bytes


class RotationWatch:
    """An independent Workload API stream to the agent, in its own thread: T0 per renewal."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.events: queue.Queue[Rotation] = queue.Queue()
        self.current: Rotation | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self._watch())
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)

    async def _watch(self) -> None:
        async with WorkloadApiClient(f"unix://{self.socket}") as client:
            async for ctx in client.x509_contexts():
                now = time.monotonic()
                svid = ctx.find(spiffe_id=WEB)
                if svid is None or (self.current and self.current.serial == svid.serial):
                    continue
                leaf = svid.chain[0]
                rotation = Rotation(
                    now,
                    svid.serial,
                    leaf.public_bytes(serialization.Encoding.DER),
                    leaf.public_bytes(serialization.Encoding.PEM),
                )
                first = self.current is None
                self.current = rotation
                if not first:
                    self.events.put(rotation)

    def next(self, timeout: float = 40.0) -> Rotation:
        """The next renewal (the newest, if several queued up)."""
        rotation = self.events.get(timeout=timeout)
        while not self.events.empty():
            rotation = self.events.get_nowait()
        return rotation

    def drain(self) -> None:
        while not self.events.empty():
            self.events.get_nowait()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)


@dataclass
class Server:
    name: str
    label: str
    socket: Path
    pid: int
    port: int = 0
    latencies: list[float] = field(default_factory=list)
    first_probe: list[bool] = field(default_factory=list)  # probed first in that rotation
    rss_idle_kb: int = 0
    rss_open_kb: int = 0
    open_seconds: float = 0.0
    last_stream_ms: list[float] = field(default_factory=list)
    median_stream_ms: list[float] = field(default_factory=list)
    cpu_per_rotation_s: list[float] = field(default_factory=list)


def rotation_phase(servers: list[Server], watch: RotationWatch, prober: Prober, n: int) -> None:
    watch.drain()
    for index in range(WARMUP + n):
        rotation = watch.next()
        order = servers if index % 2 == 0 else servers[::-1]
        pending = {s.name: s for s in order}
        seen: dict[str, float] = {}
        while pending:
            for server in list(pending.values()):
                der = prober.leaf_der(server.port)
                if der == rotation.leaf_der:
                    seen[server.name] = time.monotonic()
                    del pending[server.name]
            if time.monotonic() - rotation.t0 > 20:
                raise RuntimeError(f"rotation {index}: {list(pending)} did not present it in 20 s")
        line = ", ".join(f"{s.name} {(seen[s.name] - rotation.t0) * 1000:.1f} ms" for s in order)
        warm = "  [warm-up]" if index < WARMUP else ""
        print(f"  rotation {index + 1} (first: {order[0].name}): {line}{warm}", flush=True)
        if index < WARMUP:
            continue
        for server in servers:
            server.latencies.append((seen[server.name] - rotation.t0) * 1000)
            server.first_probe.append(server is order[0])


def fanout_phase(
    server: Server,
    watch: RotationWatch,
    procs: Procs,
    streams: int,
    rotations: int,
) -> None:
    server.rss_idle_kb = rss_kb(server.pid)
    per_client = [streams // CLIENTS + (1 if i < streams % CLIENTS else 0) for i in range(CLIENTS)]
    clients = []
    opened = time.monotonic()
    try:
        for i, count in enumerate(per_client):
            argv = [
                PYTHON,
                str(BENCH / "_loadclient.py"),
                "--socket",
                str(server.socket),
                "--streams",
                str(count),
                "--concurrency",
                "32",
                "--prefix",
                f"{server.name}-load{i}",
            ]
            clients.append(procs.start(argv, f"load-{server.name}-{i}", stdin=True, stdout=True))
        for client in clients:
            ready = read_line(client, 240, "load client ready")
            if ready["errors"]:
                raise RuntimeError(f"{server.name}: load client errors: {ready['errors']}")
        server.open_seconds = time.monotonic() - opened
        wait_idle(server.pid, timeout=120)
        server.rss_open_kb = rss_kb(server.pid)
        print(
            f"  {server.name}: {streams} streams open in {server.open_seconds:.1f} s, "
            f"RSS {server.rss_open_kb / 1024:.0f} MB",
            flush=True,
        )
        for r in range(1 + rotations):
            wait_idle(server.pid, timeout=60)
            watch.drain()
            current = watch.current
            assert current is not None
            token = base64.b64encode(current.leaf_pem).decode()
            for client in clients:
                send_line(
                    client,
                    {"cmd": "expect", "id": r, "token": token, "absent": True, "timeout": 60},
                )
            for client in clients:
                read_line(client, 10, "load client armed")
            ticks0 = cpu_ticks(server.pid)
            rotation = watch.next(60)
            times: list[float] = []
            for client in clients:
                done = read_line(client, 90, "load client done")
                if done["event"] != "done":
                    raise RuntimeError(f"{server.name}: load client: {done}")
                times.extend(done["times"])
            wait_idle(server.pid, timeout=120)
            cpu = (cpu_ticks(server.pid) - ticks0) / CLK_TCK
            ms = [(t - rotation.t0) * 1000 for t in times]
            s = summary(ms)
            warm = "  [warm-up]" if r == 0 else ""
            print(
                f"  {server.name} rotation {r + 1}: streams p50 {s['p50']:.0f} ms, last "
                f"{s['max']:.0f} ms; server CPU {cpu:.2f} s{warm}",
                flush=True,
            )
            if r == 0:
                continue
            server.last_stream_ms.append(s["max"])
            server.median_stream_ms.append(s["p50"])
            server.cpu_per_rotation_s.append(cpu)
    finally:
        for client in clients:
            procs.stop(client)


def med(values: list[float]) -> float:
    return summary(values)["p50"] if values else float("nan")


def report(args: argparse.Namespace, info: dict[str, Any], servers: list[Server]) -> dict[str, Any]:
    spire, bridge = servers
    headers = ["server", "n", "min", "p50", "p90", "p99", "max", "p50/spire", "p90/spire"]
    base = summary(spire.latencies)
    rows = []
    for s in servers:
        x = summary(s.latencies)
        rows.append(
            [
                s.label,
                x["n"],
                x["min"],
                x["p50"],
                x["p90"],
                x["p99"],
                x["max"],
                ratio(x["p50"], base["p50"]),
                ratio(x["p90"], base["p90"]),
            ]
        )
    print("\nRenewal seen by an independent watcher -> a fresh handshake presents it (ms)")
    print(table(headers, rows))
    by_order = {}
    for s in servers:
        firsts = [v for v, f in zip(s.latencies, s.first_probe, strict=True) if f]
        seconds = [v for v, f in zip(s.latencies, s.first_probe, strict=True) if not f]
        by_order[s.name] = {"probed_first_p50": med(firsts), "probed_second_p50": med(seconds)}
    print(
        "p50 by probe order (first / second): "
        + "; ".join(
            f"{k} {v['probed_first_p50']:.1f} / {v['probed_second_p50']:.1f}"
            for k, v in by_order.items()
        )
    )
    b = summary(bridge.latencies)
    targets = [
        [
            "rotation p50 <= 1.1x SPIRE",
            f"{ratio(b['p50'], base['p50']):.2f}x",
            verdict(b["p50"] <= TARGET_RATIO * base["p50"]),
        ],
        [
            "rotation p90 <= 1.1x SPIRE",
            f"{ratio(b['p90'], base['p90']):.2f}x",
            verdict(b["p90"] <= TARGET_RATIO * base["p90"]),
        ],
    ]
    if not args.skip_fanout:
        fan_rows = [
            [
                s.label,
                med(s.median_stream_ms),
                med(s.last_stream_ms),
                ratio(med(s.last_stream_ms), med(spire.last_stream_ms)),
                med(s.cpu_per_rotation_s),
                s.rss_idle_kb / 1024,
                s.rss_open_kb / 1024,
                s.open_seconds,
            ]
            for s in servers
        ]
        print(
            f"\nOne renewal -> {args.streams} streams have it (ms from the watcher's T0; "
            f"median over {args.fanout_rotations} rotations)"
        )
        print(
            table(
                [
                    "server",
                    "stream p50",
                    "last stream",
                    "last/spire",
                    "CPU s/rotation",
                    "RSS idle MB",
                    "RSS open MB",
                    "open s",
                ],
                fan_rows,
            )
        )
        targets += [
            [
                "fan-out last stream <= SPIRE",
                f"{med(bridge.last_stream_ms):.0f} vs {med(spire.last_stream_ms):.0f} ms",
                verdict(med(bridge.last_stream_ms) <= med(spire.last_stream_ms)),
            ],
            [
                "CPU per push <= SPIRE",
                f"{med(bridge.cpu_per_rotation_s):.2f} vs {med(spire.cpu_per_rotation_s):.2f} s",
                verdict(med(bridge.cpu_per_rotation_s) <= med(spire.cpu_per_rotation_s)),
            ],
            [
                "RSS below SPIRE's",
                f"{bridge.rss_open_kb / 1024:.0f} vs {spire.rss_open_kb / 1024:.0f} MB",
                verdict(bridge.rss_open_kb < spire.rss_open_kb),
            ],
        ]
    print("\nTargets (same run)")
    print(table(["target", "measured", "verdict"], targets))
    return {
        "benchmark": "spire",
        "spire_version": SPIRE_VERSION,
        "machine": info,
        "args": vars(args),
        "warmup_rotations": WARMUP,
        "rotation_ms": {s.name: summary(s.latencies) for s in servers},
        "rotation_by_probe_order": by_order,
        "fanout": {
            s.name: {
                "median_stream_ms": s.median_stream_ms,
                "last_stream_ms": s.last_stream_ms,
                "cpu_per_rotation_s": s.cpu_per_rotation_s,
                "rss_idle_kb": s.rss_idle_kb,
                "rss_open_kb": s.rss_open_kb,
                "open_seconds": s.open_seconds,
            }
            for s in servers
        },
        "targets": {row[0]: [row[1], row[2]] for row in targets},
        "raw": {"rotation_ms": {s.name: s.latencies for s in servers}},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    print(machine_line(info), flush=True)
    server_bin, agent_bin = spire_binaries()
    with workspace() as wd:
        procs = Processes(wd)
        load_procs = Procs(wd)
        envoys = Envoys(wd / "envoy")
        watch = None
        agent: SpireAgent | None = None
        spire_server: SpireServer | None = None
        try:
            spire_server = SpireServer(procs, server_bin).start()
            agent = SpireAgent(spire_server, agent_bin).start()
            spire_server.entry_create(agent.spiffe_id, WEB, own_uid_selector(), hint="web")
            agent.wait_svid(WEB)
            client = spire_server.mint(f"spiffe://{TRUST_DOMAIN}/client")
            sds_socket = wd / "sds" / "sds.sock"
            profile = wd / "bridge.prof" if args.profile else None
            wrapper = [str(BENCH / "_profiled.py"), str(profile)] if profile else ["-m", "sds"]
            bridge = procs.start(
                [
                    PYTHON,
                    *wrapper,
                    "--log-level",
                    "INFO",
                    "run",
                    "--workload-api",
                    f"unix://{agent.socket}",
                    "--listen",
                    f"unix://{sds_socket}",
                    "--admin",
                    "127.0.0.1:0",
                ],
                "bridge",
            )
            wait_until(sds_socket.exists, 60, "bridge SDS socket", bridge)
            assert agent.proc is not None
            servers = [
                Server("spire", f"SPIRE {SPIRE_VERSION} agent SDS", agent.socket, agent.proc.pid),
                Server("bridge", "bridge (`sds run` on the agent)", sds_socket, bridge.pid),
            ]
            for s in servers:
                listeners, clusters = (
                    [downstream_mtls_listener("in")],
                    [sds_cluster("sds", s.socket)],
                )
                config = bootstrap(f"bench-{s.name}", "bench", listeners, clusters)
                envoy = envoys.start(config, log_level="warning", name=f"envoy-{s.name}")
                s.port = envoy.listener_port("in")
            watch = RotationWatch(agent.socket)
            prober = Prober(client.ca, client.cert, client.key, wd)
            print(f"rotation: {args.rotations} renewals (+{WARMUP} warm-up)", flush=True)
            rotation_phase(servers, watch, prober, args.rotations)
            envoys.close()
            if not args.skip_fanout:
                for s in servers:
                    print(f"fan-out: {s.label}", flush=True)
                    if profile is not None and s.name == "bridge":
                        os.kill(bridge.pid, signal.SIGUSR1)
                    fanout_phase(s, watch, load_procs, args.streams, args.fanout_rotations)
            result = report(args, info, servers)
            if profile is not None:
                os.kill(bridge.pid, signal.SIGUSR2)
                wait_until(profile.exists, 10, "bridge profile written")
                time.sleep(0.5)
                result["profile_top"] = profile_top(profile)
                print("\ncProfile of the bridge over the fan-out (main thread):")
                print(result["profile_top"])
            return result
        except BaseException:
            for proc, log in procs._procs:
                del proc
                sys.stderr.write(f"\n--- {log.name}\n{log.read_text(errors='replace')[-2500:]}")
            raise
        finally:
            if watch is not None:
                watch.close()
            envoys.close()
            load_procs.close()
            procs.close()
            for owned in (agent, spire_server):
                if owned is not None:
                    owned.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 rotations, 200 streams, 1 fan-out")
    parser.add_argument("--rotations", type=int, default=None, help="measured renewals (>= 20)")
    parser.add_argument("--streams", type=int, default=None)
    parser.add_argument("--fanout-rotations", type=int, default=None)
    parser.add_argument("--skip-fanout", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the bridge over its fan-out rotations"
    )
    args = parser.parse_args()
    if args.rotations is None:
        args.rotations = 6 if args.quick else 20
    if args.streams is None:
        args.streams = 200 if args.quick else 1000
    if args.fanout_rotations is None:
        args.fanout_rotations = 1 if args.quick else 3
    return run_benchmark("spire", run, args)


if __name__ == "__main__":
    sys.exit(main())
