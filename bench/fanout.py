"""Fan-out: one rotation pushed to 1,000 SDS streams and 3 real Envoys on one SDS server.

Usage: ``.venv/bin/python bench/fanout.py [--quick] [--streams N] [--rotations R]
[--no-envoy-node] [--variant gc-freeze]``

For each case, in this order, on a fresh server:

* **floor**: the zero-work SDS server (``bench/_floor.py``), the baseline;
* **bridge**: fake Workload API (``bench/_upstream.py``) -> ``sds run``;
* **bridge, Envoy-sized requests** (unless ``--no-envoy-node``): as bridge,
  but every load-client request carries the Node a real Envoy 1.40 sent
  (captured from the floor case: ~61 KB, 516 extension entries), as Envoy
  does on every request including ACKs.
* **what-if, Envoy-sized requests** (only with ``--variant``): the previous
  case with ``sds run`` started through ``bench/_variant.py VARIANT``. Not
  the shipped code.

Each case: 3 Envoys (``downstream_mtls_listener``, ``default`` + ``ROOTCA``)
and N (default 1,000) StreamSecrets streams from 2 load-client processes
(``bench/_loadclient.py``: one connection and node id per stream, asks for
``default``, ACKs every response). Per rotation: both clients are armed with
the new leaf's PEM; T0 is taken just before the rotation command is written;
each stream records when a response with the new leaf arrived
(``time.monotonic``, one clock for every process); this process polls the 3
Envoys with fresh handshakes (2 ms apart) until each presents the new leaf.
"Last" = the latest of all 1,000 streams and 3 Envoys. Between rotations the
server is left to go idle (its ACK processing finishes). VmRSS of the server
is read at 0 streams, with all streams open, and after the rotations.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
from _common import (
    ABSOLUTE,
    BENCH,
    CLK_TCK,
    PYTHON,
    Prober,
    Procs,
    cpu_ticks,
    machine,
    machine_line,
    make_material,
    ratio,
    read_line,
    request_decoding,
    request_node,
    rss_breakdown_kb,
    rss_kb,
    run_benchmark,
    sds_argv,
    send_line,
    summary,
    table,
    verdict,
    wait_idle,
    wait_until,
    workspace,
)

from tests.harness.envoy import Envoys, bootstrap, downstream_mtls_listener, sds_cluster

TARGET_LAST_S = 1.0
TARGET_RATIO = 1.5  # the same bound as rotation.py's ratio to the floor
TARGET_RSS_MB = 150.0
ENVOYS = 3
CLIENTS = 2


@dataclass
class Case:
    name: str
    label: str
    envoy_node: bool = False
    variant: str | None = None
    rss0_kb: int = 0
    rss_open_kb: int = 0
    rss_after_kb: int = 0
    hwm_kb: int = 0
    anon_open_kb: int = 0
    open_seconds: float = 0.0
    last_ms: list[float] = field(default_factory=list)
    last_stream_ms: list[float] = field(default_factory=list)
    median_stream_ms: list[float] = field(default_factory=list)
    p99_stream_ms: list[float] = field(default_factory=list)
    first_stream_ms: list[float] = field(default_factory=list)
    envoy_last_ms: list[float] = field(default_factory=list)
    cpu_per_rotation_s: list[float] = field(default_factory=list)
    idle_after_s: list[float] = field(default_factory=list)
    # Per measured rotation: every stream's arrival (ms after T0), sorted; the
    # Envoys' separately. bench/plot.py draws the arrival curves from these.
    arrivals_ms: list[list[float]] = field(default_factory=list)
    envoy_arrivals_ms: list[list[float]] = field(default_factory=list)
    client_errors: int = 0


def run_case(
    case: Case,
    args: argparse.Namespace,
    *,
    wd: Path,
    procs: Procs,
    mat: dict[str, Any],
    material: Path,
    first_index: int,
) -> int:
    """Run one case; returns the next unused SVID index."""
    sock = wd / case.name / "sds.sock"
    upstream = None
    if case.name == "floor":
        sock.parent.mkdir(mode=0o700)
        server = procs.start(
            [
                PYTHON,
                str(BENCH / "_floor.py"),
                "--socket",
                str(sock),
                "--material",
                str(material),
                "--dump-first",
                str(wd / "envoy-request.bin"),
            ],
            case.name,
            stdin=True,
            stdout=True,
        )
        read_line(server, 30, "floor ready")
        trigger = server
    else:
        upstream_sock = wd / f"wl-{case.name}.sock"
        upstream = procs.start(
            [
                PYTHON,
                str(BENCH / "_upstream.py"),
                "--socket",
                str(upstream_sock),
                "--material",
                str(material),
            ],
            f"upstream-{case.name}",
            stdin=True,
            stdout=True,
        )
        read_line(upstream, 30, "fake Workload API ready")
        trigger = upstream
        sds_args = [
            "--log-level",
            "INFO",
            "run",
            "--workload-api",
            f"unix://{upstream_sock}",
            "--listen",
            f"unix://{sock}",
            "--admin",
            "127.0.0.1:0",
        ]
        if case.variant is not None:
            argv = [PYTHON, str(BENCH / "_variant.py"), case.variant, *sds_args]
        else:
            argv = sds_argv(*sds_args)
        server = procs.start(argv, case.name)
        wait_until(sock.exists, 30, "bridge SDS socket", server)
    # The first SVID may have been replaced by an earlier case's rotations: start this
    # case on a fresh one, so every Envoy and stream begins from a known leaf.
    if first_index:
        send_line(trigger, str(first_index))
    current = first_index
    time.sleep(1.0)
    wait_idle(server.pid)
    case.rss0_kb = rss_kb(server.pid)

    envoys = Envoys(wd / f"envoy-{case.name}")
    clients = []
    try:
        ports = []
        for k in range(ENVOYS):
            config = bootstrap(
                f"bench-{case.name}-{k}",
                "bench",
                [downstream_mtls_listener("in")],
                [sds_cluster("sds", sock)],
            )
            envoy = envoys.start(config, log_level="warning", name=f"envoy-{case.name}-{k}")
            ports.append(envoy.listener_port("in"))
        prober = Prober(mat["ca_pem"], mat["client_cert"], mat["client_key"], wd)
        for port in ports:
            if prober.leaf_der(port) != mat["leaf_der"][current]:
                raise RuntimeError(f"{case.name}: an Envoy does not present the current leaf")

        node_file = None
        if case.envoy_node:
            request = (wd / "envoy-request.bin").read_bytes()
            node = request_node(request)
            assert node is not None
            node_file = wd / "envoy-node.bin"
            node_file.write_bytes(node)
        per_client = [
            args.streams // CLIENTS + (1 if i < args.streams % CLIENTS else 0)
            for i in range(CLIENTS)
        ]
        opened_at = time.monotonic()
        for i, count in enumerate(per_client):
            argv = [
                PYTHON,
                str(BENCH / "_loadclient.py"),
                "--socket",
                str(sock),
                "--streams",
                str(count),
                "--concurrency",
                "32",
                "--prefix",
                f"{case.name}-load{i}",
            ]
            if node_file is not None:
                argv += ["--node-file", str(node_file)]
            clients.append(procs.start(argv, f"load-{case.name}-{i}", stdin=True, stdout=True))
        for client in clients:
            ready = read_line(client, 240, "load client ready")
            if ready["errors"]:
                raise RuntimeError(f"load client errors: {ready['errors']}")
        case.open_seconds = time.monotonic() - opened_at
        print(
            f"  {case.name}: {args.streams} streams open in {case.open_seconds:.1f} s", flush=True
        )
        wait_idle(server.pid, timeout=120)
        case.rss_open_kb = rss_kb(server.pid)
        case.anon_open_kb = rss_breakdown_kb(server.pid)["RssAnon"]

        slow = case.envoy_node and case.variant is None and request_decoding() == "envoy-data-plane"
        rotations = min(args.rotations, 3) if slow else args.rotations
        for r in range(args.warmup + rotations):
            current += 1
            token = base64.b64encode(mat["leaf_pem"][current]).decode()
            for client in clients:
                send_line(client, {"cmd": "expect", "id": current, "token": token})
            for client in clients:
                read_line(client, 10, "load client armed")
            ticks0 = cpu_ticks(server.pid)
            t0 = time.monotonic()
            send_line(trigger, str(current))
            pending = dict(enumerate(ports))
            envoy_done: dict[int, float] = {}
            while pending:
                for k, port in list(pending.items()):
                    if prober.leaf_der(port) == mat["leaf_der"][current]:
                        envoy_done[k] = time.monotonic()
                        del pending[k]
                if time.monotonic() - t0 > 60:
                    raise RuntimeError(f"{case.name}: Envoys did not rotate within 60 s")
                time.sleep(0.002)
            times: list[float] = []
            for client in clients:
                done = read_line(client, 90, "load client done")
                if done["event"] != "done":
                    raise RuntimeError(f"{case.name}: load client: {done}")
                times.extend(done["times"])
            idle = wait_idle(server.pid, timeout=120)
            cpu = (cpu_ticks(server.pid) - ticks0) / CLK_TCK
            streams_ms = [(t - t0) * 1000 for t in times]
            envoy_ms = [(t - t0) * 1000 for t in envoy_done.values()]
            last = max(streams_ms + envoy_ms)
            s = summary(streams_ms)
            print(
                f"  {case.name} rotation {r + 1}: last {last:.0f} ms (streams: first "
                f"{s['min']:.0f}, p50 {s['p50']:.0f}, p99 {s['p99']:.0f}, last {s['max']:.0f}; "
                f"Envoys last {max(envoy_ms):.0f}); server CPU {cpu:.2f} s"
                + ("  [warm-up]" if r < args.warmup else ""),
                flush=True,
            )
            if r < args.warmup:
                continue
            case.last_ms.append(last)
            case.last_stream_ms.append(s["max"])
            case.median_stream_ms.append(s["p50"])
            case.p99_stream_ms.append(s["p99"])
            case.first_stream_ms.append(s["min"])
            case.envoy_last_ms.append(max(envoy_ms))
            case.cpu_per_rotation_s.append(cpu)
            case.idle_after_s.append(idle)
            case.arrivals_ms.append(sorted(round(t, 3) for t in streams_ms))
            case.envoy_arrivals_ms.append(sorted(round(t, 3) for t in envoy_ms))
        case.rss_after_kb = rss_kb(server.pid)
        case.hwm_kb = _common.hwm_kb(server.pid)
        for client in clients:
            send_line(client, {"cmd": "stats"})
            stats = read_line(client, 10, "load client stats")
            case.client_errors += stats["errors"]
        return current + 1
    finally:
        for client in clients:
            procs.stop(client)
        envoys.close()
        procs.stop(server)
        if upstream is not None:
            procs.stop(upstream)


def med(values: list[float]) -> float:
    return summary(values)["p50"] if values else float("nan")


def report(args: argparse.Namespace, info: dict[str, Any], cases: list[Case]) -> dict[str, Any]:
    by = {c.name: c for c in cases}
    floor = by["floor"]
    rows = []
    for c in cases:
        rows.append(
            [
                c.label,
                med(c.first_stream_ms),
                med(c.median_stream_ms),
                med(c.p99_stream_ms),
                med(c.last_stream_ms),
                med(c.envoy_last_ms),
                med(c.last_ms),
                ratio(med(c.last_ms), med(floor.last_ms)),
                med(c.cpu_per_rotation_s),
            ]
        )
    print(
        f"\nOne rotation -> {args.streams} streams + {ENVOYS} Envoys have the new leaf "
        f"(ms; median over {args.rotations} rotations)"
    )
    print(
        table(
            [
                "server",
                "first stream",
                "stream p50",
                "stream p99",
                "last stream",
                "last Envoy",
                "last of all",
                "last/floor",
                "server CPU s",
            ],
            rows,
        )
    )
    mem_rows = []
    for c in cases:
        per_stream = (c.rss_open_kb - c.rss0_kb) / max(1, args.streams + 2 * ENVOYS)
        mem_rows.append(
            [
                c.label,
                c.rss0_kb / 1024,
                c.rss_open_kb / 1024,
                c.rss_after_kb / 1024,
                c.hwm_kb / 1024,
                per_stream,
                ratio(c.rss_open_kb, floor.rss_open_kb),
                c.open_seconds,
            ]
        )
    print(f"\nServer memory (MB) and stream set-up ({args.streams} streams + {ENVOYS} Envoys)")
    print(
        table(
            [
                "server",
                "RSS 0 streams",
                "RSS all open",
                "RSS after rotations",
                "peak (VmHWM)",
                "KB per stream",
                "RSS open/floor",
                "open time s",
            ],
            mem_rows,
        )
    )
    bridge = by["bridge"]
    last_ratio = ratio(med(bridge.last_ms), med(floor.last_ms))
    # Latency verdicts only as ratios to this run's floor (a shared machine's load
    # moves absolute times); memory does not depend on load and keeps its limit.
    targets = [
        [
            f"last of {args.streams} streams <= {TARGET_RATIO}x floor",
            f"{last_ratio:.2f}x",
            verdict(last_ratio <= TARGET_RATIO),
        ],
        [
            f"(last of {args.streams} streams <= 1 s on an idle machine)",
            f"{med(bridge.last_ms):.0f} ms",
            ABSOLUTE,
        ],
        [
            f"RSS at {args.streams} streams <= 150 MB",
            f"{bridge.rss_open_kb / 1024:.1f} MB "
            f"(after rotations {bridge.rss_after_kb / 1024:.1f})",
            verdict(max(bridge.rss_open_kb, bridge.rss_after_kb) / 1024 <= TARGET_RSS_MB),
        ],
    ]
    for name in ("bridge-envoy-node", "variant-envoy-node"):
        if name not in by:
            continue
        heavy = by[name]
        what = "same, Envoy-sized requests" if name == "bridge-envoy-node" else heavy.label
        heavy_ratio = ratio(med(heavy.last_ms), med(floor.last_ms))
        targets.append(
            [
                f"{what}: last <= {TARGET_RATIO}x floor",
                f"{heavy_ratio:.2f}x",
                verdict(heavy_ratio <= TARGET_RATIO),
            ]
        )
        targets.append(
            [f"({what}: last <= 1 s on an idle machine)", f"{med(heavy.last_ms):.0f} ms", ABSOLUTE]
        )
        targets.append(
            [
                f"{what}: RSS <= 150 MB",
                f"{max(heavy.rss_open_kb, heavy.rss_after_kb) / 1024:.1f} MB",
                verdict(max(heavy.rss_open_kb, heavy.rss_after_kb) / 1024 <= TARGET_RSS_MB),
            ]
        )
    print("\nTargets")
    print(table(["target", "measured", "verdict"], targets))
    return {
        "benchmark": "fanout",
        "machine": info,
        "args": vars(args),
        "cases": {c.name: vars(c) for c in cases},
        "targets": {row[0]: [row[1], row[2]] for row in targets},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    print(machine_line(info), flush=True)
    cases = [Case("floor", "floor (zero-work SDS)"), Case("bridge", "bridge (`sds run`)")]
    if args.envoy_node:
        cases.append(Case("bridge-envoy-node", "bridge, Envoy-sized requests", envoy_node=True))
        if args.variant:
            variant = args.variant
            cases.append(
                Case(
                    "variant-envoy-node",
                    f"what-if {variant}, Envoy-sized",
                    envoy_node=True,
                    variant=variant,
                )
            )
    per_case = args.warmup + args.rotations + 1
    with workspace() as wd, Procs(wd) as procs:
        material = wd / "material.json"
        mat = make_material(material, per_case * len(cases) + 1)
        index = 0
        for case in cases:
            print(f"case {case.label}", flush=True)
            index = run_case(
                case, args, wd=wd, procs=procs, mat=mat, material=material, first_index=index
            )
        return report(args, info, cases)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 streams, 2 rotations")
    parser.add_argument("--streams", type=int, default=None)
    parser.add_argument("--rotations", type=int, default=None, help="measured rotations per case")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--variant",
        default=None,
        choices=["gc-freeze"],
        help="also measure a what-if case (bench/_variant.py); off by default",
    )
    parser.add_argument(
        "--no-envoy-node",
        dest="envoy_node",
        action="store_false",
        help="skip the case with Envoy-sized requests",
    )
    args = parser.parse_args()
    if args.streams is None:
        args.streams = 200 if args.quick else 1000
    if args.rotations is None:
        args.rotations = 2 if args.quick else 5
    return run_benchmark("fanout", run, args)


if __name__ == "__main__":
    sys.exit(main())
