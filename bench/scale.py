"""Scale past the node: 10,000 SDS streams, a sweep of stream counts, a reconnect storm.

Usage: ``.venv/bin/python bench/scale.py [--quick] [--streams N] [--sweep N,N,...]
[--rotations R] [--storm-streams N] [--storm-runs R] [--parts fanout,sweep,storm]``

Every figure is measured for the bridge (fake Workload API ``bench/_upstream.py``
-> ``sds run``) and for the zero-work floor (``bench/_floor.py``) in the same
run. Every load stream (``bench/_loadclient.py``: one connection and node id
per stream, ACKs every response) sends the Node a real Envoy 1.40 sent (~61 KB,
captured at the start of the run from one Envoy against the floor) on its first
request, as an Envoy configured by ``sds envoy-bootstrap``
(``set_node_on_first_message_only: true``) does; ``--node-every-request``
repeats it on every ACK too (Envoy's default).

1. **fanout** (default 10,000 streams, 3 measured rotations after 1 warm-up):
   T0 just before the rotation command is written; "last" = the latest stream
   to receive a response carrying the new leaf (``time.monotonic``, one clock
   for every process). Server CPU per push = utime+stime from T0 until the
   server is idle again (its ACK processing included). VmRSS at 0 streams, with
   every stream open, after the rotations, and VmHWM.
2. **sweep** (default 100, 300, 1,000, 3,000, 10,000 streams; the 10,000 row
   is the fanout part's): the same per count, 3 rotations, and a least-squares
   slope of push time and RSS per stream.
3. **storm** (default 1,000 streams, 3 runs): every stream connected and
   holding the current leaf, the server is killed with SIGKILL and a new one
   started on the same socket path. The clients reconnect as soon as the socket
   accepts connections again (one probe per client process every 2 ms; failed
   attempts retry after 2-10 ms). T0 = the moment this process sees the new
   socket inode (polled every 1 ms); "all back" = the last stream's first
   response on its new connection. Peak RSS = VmHWM of the new server.

A full run (not ``--quick``, all three parts) rewrites ``docs/bench/scale.json``
(the summary BENCHMARKS.md cites, committed) and ``docs/bench/scale.png`` (push
time and RSS against stream count, bridge and floor); ``--no-summary`` leaves
both alone, ``--plot-only`` redraws the PNG from the JSON. The raw run goes to
``bench/results/`` (gitignored).

File descriptors: each stream costs the server one and a client one; this
process raises ``RLIMIT_NOFILE`` soft to hard before starting anything, and
the children inherit it. An operator running a node-level bridge must allow
at least (Envoy connections + ~50) descriptors (``LimitNOFILE=`` in systemd,
``ulimit -n``); Kubernetes containers inherit the runtime's limit (commonly
1,048,576).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common
from _common import (
    ABSOLUTE,
    BENCH,
    CLK_TCK,
    PYTHON,
    Procs,
    cpu_ticks,
    machine,
    machine_line,
    make_material,
    ratio,
    read_line,
    request_node,
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

SUMMARY = _common.REPO / "docs" / "bench" / "scale.json"
PLOT = _common.REPO / "docs" / "bench" / "scale.png"
TARGET_LAST_S = 1.0
TARGET_RATIO = 1.3
TARGET_RSS_MB = 250.0
TARGET_STORM_S = 1.0
STREAMS_PER_CLIENT = 2500  # load-client processes: 4 for 10,000 streams
STORM_PER_CLIENT = 500  # 2 for the 1,000-stream storm, as fanout.py's 2 clients
OPEN_IN_FLIGHT = 96  # streams opening at once over all clients (below grpclib's backlog of 100)


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class Server:
    """One SDS server under test (the floor or the bridge) and what makes it rotate."""

    def __init__(
        self,
        kind: str,
        wd: Path,
        procs: Procs,
        material: Path,
        tag: str,
        *,
        profile: Path | None = None,
    ) -> None:
        self.kind = kind
        self.profile = profile
        self.procs = procs
        self.wd = wd
        self.material = material
        self.tag = tag
        self.sock = wd / f"{kind}-{tag}" / "sds.sock"
        self.sock.parent.mkdir(mode=0o700)
        self.upstream: subprocess.Popen[bytes] | None = None
        self.generation = 0
        if kind == "bridge":
            upstream_sock = wd / f"wl-{tag}.sock"
            self.upstream = procs.start(
                [
                    PYTHON,
                    str(BENCH / "_upstream.py"),
                    "--socket",
                    str(upstream_sock),
                    "--material",
                    str(material),
                ],
                f"upstream-{tag}",
                stdin=True,
                stdout=True,
            )
            read_line(self.upstream, 30, "fake Workload API ready")
            self.upstream_sock = upstream_sock
        self.proc = self._start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.generation += 1
        name = f"{self.kind}-{self.tag}-{self.generation}"
        if self.kind == "floor":
            argv = [
                PYTHON,
                str(BENCH / "_floor.py"),
                "--socket",
                str(self.sock),
                "--material",
                str(self.material),
            ]
            return self.procs.start(argv, name, stdin=True, stdout=True)
        args = [
            "--log-level",
            "WARNING",
            "run",
            "--workload-api",
            f"unix://{self.upstream_sock}",
            "--listen",
            f"unix://{self.sock}",
            "--admin",
            "127.0.0.1:0",
        ]
        if self.profile is not None:  # cProfile switched on by SIGUSR1, written on SIGUSR2
            return self.procs.start(
                [PYTHON, str(BENCH / "_profiled.py"), str(self.profile), *args], name
            )
        return self.procs.start(sds_argv(*args), name)

    def _start(self) -> subprocess.Popen[bytes]:
        proc = self._spawn()
        if self.kind == "floor":
            read_line(proc, 30, "floor ready")
        else:
            wait_until(self.sock.exists, 30, "bridge SDS socket", proc)
        return proc

    def rotate(self, index: int) -> None:
        send_line(self.upstream if self.upstream is not None else self.proc, str(index))

    def kill_and_restart(self) -> tuple[float, subprocess.Popen[bytes]]:
        """SIGKILL the server, start a new one; (monotonic time its socket accepted, process).

        "Bound" is observed as the first successful connect to the path (polled every
        1 ms): the old socket file stays behind a killed server and refuses connections.
        """
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        new = self._spawn()
        deadline = time.monotonic() + 60
        while True:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.sock))
                bound = time.monotonic()
                break
            except OSError:
                pass
            finally:
                probe.close()
            if new.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"restarted {self.kind} never bound its socket")
            time.sleep(0.001)
        if self.kind == "floor":
            read_line(new, 30, "floor ready")
        self.proc = new
        return bound, new

    def stop(self) -> None:
        self.procs.stop(self.proc)
        if self.upstream is not None:
            self.procs.stop(self.upstream)


def start_clients(
    procs: Procs,
    server: Server,
    streams: int,
    node_file: Path,
    *,
    reconnect: bool = False,
    per_process: int = STREAMS_PER_CLIENT,
    node_first_only: bool = True,
) -> list[subprocess.Popen[bytes]]:
    count = max(1, math.ceil(streams / per_process))
    per_client = [streams // count + (1 if i < streams % count else 0) for i in range(count)]
    clients = []
    for i, n in enumerate(per_client):
        argv = [
            PYTHON,
            str(BENCH / "_loadclient.py"),
            "--socket",
            str(server.sock),
            "--streams",
            str(n),
            "--concurrency",
            str(max(8, OPEN_IN_FLIGHT // count)),
            "--prefix",
            f"{server.kind}-{server.tag}-{i}",
            "--node-file",
            str(node_file),
        ]
        if reconnect:
            argv.append("--reconnect")
        if node_first_only:
            argv.append("--node-first-only")
        clients.append(
            procs.start(argv, f"load-{server.kind}-{server.tag}-{i}", stdin=True, stdout=True)
        )
    for client in clients:
        ready = read_line(client, 600, "load client ready")
        if ready["errors"]:
            raise RuntimeError(f"load client errors: {ready['errors']}")
    return clients


def arm(clients: list[subprocess.Popen[bytes]], token: bytes, ident: int, timeout: float) -> None:
    encoded = base64.b64encode(token).decode()
    for client in clients:
        send_line(client, {"cmd": "expect", "id": ident, "token": encoded, "timeout": timeout})
    for client in clients:
        read_line(client, 30, "load client armed")


def collect(clients: list[subprocess.Popen[bytes]], timeout: float) -> list[float]:
    times: list[float] = []
    for client in clients:
        done = read_line(client, timeout + 30, "load client done")
        if done["event"] != "done":
            raise RuntimeError(f"load client: {done}")
        times.extend(done["times"])
    return times


def client_stats(clients: list[subprocess.Popen[bytes]]) -> dict[str, int]:
    total = {"errors": 0, "reconnects": 0, "reconnect_failures": 0}
    for client in clients:
        send_line(client, {"cmd": "stats"})
        stats = read_line(client, 30, "load client stats")
        for key in total:
            total[key] += stats.get(key, 0)
    return total


def fanout_case(
    kind: str,
    streams: int,
    rotations: int,
    warmup: int,
    *,
    wd: Path,
    procs: Procs,
    mat: dict[str, Any],
    material: Path,
    node_file: Path,
    index: list[int],
    profile: Path | None = None,
    profile_copy: Path | None = None,
    node_first_only: bool = True,
) -> dict[str, Any]:
    """One server, ``streams`` streams, ``warmup + rotations`` rotations."""
    server = Server(kind, wd, procs, material, f"f{streams}", profile=profile)
    clients: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {"kind": kind, "streams": streams, "last_ms": [], "p50_ms": []}
    out["cpu_s"] = []
    try:
        index[0] += 1
        server.rotate(index[0])  # start from a fresh leaf the clients have not seen
        time.sleep(0.5)
        wait_idle(server.proc.pid)
        out["rss0_kb"] = rss_kb(server.proc.pid)
        opened = time.monotonic()
        clients = start_clients(procs, server, streams, node_file, node_first_only=node_first_only)
        out["open_s"] = time.monotonic() - opened
        wait_idle(server.proc.pid, timeout=300)
        out["rss_open_kb"] = rss_kb(server.proc.pid)
        for r in range(warmup + rotations):
            if profile is not None and r == warmup:
                os.kill(server.proc.pid, signal.SIGUSR1)
            index[0] += 1
            arm(clients, mat["leaf_pem"][index[0]], index[0], 120)
            ticks0 = cpu_ticks(server.proc.pid)
            t0 = time.monotonic()
            server.rotate(index[0])
            times = collect(clients, 120)
            wait_idle(server.proc.pid, timeout=300)
            cpu = (cpu_ticks(server.proc.pid) - ticks0) / CLK_TCK
            arrivals = [(t - t0) * 1000 for t in times]
            s = summary(arrivals)
            print(
                f"    {kind} {streams} streams, rotation {r + 1}: last {s['max']:.0f} ms, "
                f"p50 {s['p50']:.0f} ms, CPU {cpu:.2f} s" + ("  [warm-up]" if r < warmup else ""),
                flush=True,
            )
            if r < warmup:
                continue
            out["last_ms"].append(s["max"])
            out["p50_ms"].append(s["p50"])
            out["cpu_s"].append(cpu)
        if profile is not None:
            os.kill(server.proc.pid, signal.SIGUSR2)
            wait_until(profile.exists, 30, "profile written")
            time.sleep(0.5)
            out["profile"] = top_functions(profile)
            if profile_copy is not None:
                shutil.copyfile(profile, profile_copy)
        out["rss_after_kb"] = rss_kb(server.proc.pid)
        out["hwm_kb"] = _common.hwm_kb(server.proc.pid)
        out["client"] = client_stats(clients)
        return out
    finally:
        for client in clients:
            procs.stop(client)
        server.stop()


def storm_case(
    kind: str,
    streams: int,
    runs: int,
    *,
    wd: Path,
    procs: Procs,
    mat: dict[str, Any],
    material: Path,
    node_file: Path,
    index: list[int],
    node_first_only: bool = True,
) -> dict[str, Any]:
    """``runs`` kill -9 + restart of one server under ``streams`` reconnecting streams."""
    server = Server(kind, wd, procs, material, f"s{streams}")
    clients: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {"kind": kind, "streams": streams, "back_ms": [], "p50_ms": []}
    out["hwm_kb"] = []
    out["first_ms"] = []
    try:
        # Leaf 0: what a restarted floor serves, and what this fresh upstream keeps serving.
        current = 0
        clients = start_clients(
            procs,
            server,
            streams,
            node_file,
            reconnect=True,
            per_process=STORM_PER_CLIENT,
            node_first_only=node_first_only,
        )
        for r in range(runs):
            wait_idle(server.proc.pid, timeout=300)
            arm(clients, mat["leaf_pem"][current], 1000 + r, 120)
            bound, proc = server.kill_and_restart()
            times = collect(clients, 120)
            arrivals = [(t - bound) * 1000 for t in times]
            s = summary(arrivals)
            wait_idle(proc.pid, timeout=300)
            hwm = _common.hwm_kb(proc.pid)
            print(
                f"    {kind} storm {r + 1}: {streams} streams back {s['max']:.0f} ms after the "
                f"socket was bound (first {s['min']:.0f}, p50 {s['p50']:.0f}); "
                f"peak RSS {hwm / 1024:.1f} MB",
                flush=True,
            )
            out["back_ms"].append(s["max"])
            out["p50_ms"].append(s["p50"])
            out["first_ms"].append(s["min"])
            out["hwm_kb"].append(hwm)
        out["client"] = client_stats(clients)
        return out
    finally:
        for client in clients:
            procs.stop(client)
        server.stop()


def top_functions(path: Path, limit: int = 25) -> list[list[Any]]:
    """The functions with the most own time in a cProfile dump: [name, calls, tottime, cumtime]."""
    import pstats

    stats: Any = pstats.Stats(str(path))
    rows = []
    for (file, line, func), (_, calls, tottime, cumtime, _) in stats.stats.items():
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
        rows.append([f"{func} ({where})", calls, tottime, cumtime])
    rows.sort(key=lambda row: -row[2])
    return rows[:limit]


def capture_node(wd: Path, procs: Procs, material: Path) -> Path:
    """The Node a real Envoy sends, captured by the floor from one Envoy's first request."""
    sock = wd / "capture" / "sds.sock"
    sock.parent.mkdir(mode=0o700)
    dump = wd / "envoy-request.bin"
    floor = procs.start(
        [
            PYTHON,
            str(BENCH / "_floor.py"),
            "--socket",
            str(sock),
            "--material",
            str(material),
            "--dump-first",
            str(dump),
        ],
        "capture-floor",
        stdin=True,
        stdout=True,
    )
    read_line(floor, 30, "floor ready")
    envoys = Envoys(wd / "envoy-capture")
    try:
        envoys.start(
            bootstrap(
                "scale-capture",
                "bench",
                [downstream_mtls_listener("in")],
                [sds_cluster("sds", sock)],
            ),
            log_level="warning",
            name="envoy-capture",
        )
        wait_until(lambda: dump.exists() and dump.stat().st_size > 0, 60, "Envoy's first request")
    finally:
        envoys.close()
        procs.stop(floor)
    node = request_node(dump.read_bytes())
    assert node is not None
    node_file = wd / "envoy-node.bin"
    node_file.write_bytes(node)
    return node_file


def med(values: list[float]) -> float:
    return summary(values)["p50"] if values else float("nan")


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    soft, hard = raise_nofile()
    info["nofile"] = [soft, hard]
    print(machine_line(info) + f"; RLIMIT_NOFILE {soft}/{hard}", flush=True)
    need = max([args.streams, *args.sweep, args.storm_streams]) + 200
    if soft < need:
        raise SystemExit(f"RLIMIT_NOFILE hard limit {hard} < {need}: raise it (ulimit -Hn)")
    parts = set(args.parts.split(","))
    counts = sorted(set(args.sweep) | ({args.streams} if "fanout" in parts else set()))
    if "sweep" not in parts:
        counts = [args.streams] if "fanout" in parts else []
    rotations_needed = len(counts) * 2 * (args.warmup + args.rotations + 1) + 2 * 2 + 4
    with workspace("sdss-") as wd, Procs(wd) as procs:
        material = wd / "material.json"
        mat = make_material(material, rotations_needed)
        node_file = capture_node(wd, procs, material)
        print(f"Envoy's Node: {node_file.stat().st_size} bytes", flush=True)
        index = [0]
        fan: dict[str, dict[int, dict[str, Any]]] = {"floor": {}, "bridge": {}}
        for n in counts:
            rotations = args.rotations if n == args.streams else args.sweep_rotations
            for kind in ("floor", "bridge"):
                print(f"  {kind}: {n} streams", flush=True)
                fan[kind][n] = fanout_case(
                    kind,
                    n,
                    rotations,
                    args.warmup,
                    wd=wd,
                    procs=procs,
                    mat=mat,
                    material=material,
                    node_file=node_file,
                    index=index,
                    node_first_only=not args.node_every_request,
                    profile_copy=args.profile,
                    profile=wd / "bridge.prof"
                    if args.profile and kind == "bridge" and n == args.streams
                    else None,
                )
                if "profile" in fan[kind][n]:
                    print(f"\ncProfile of the bridge over {rotations} rotations (own time)")
                    print(
                        table(
                            ["function", "calls", "tottime s", "cumtime s"],
                            fan[kind][n]["profile"],
                        )
                    )
        storm: dict[str, dict[str, Any]] = {}
        if "storm" in parts:
            for kind in ("floor", "bridge"):
                print(f"  storm: {kind}, {args.storm_streams} streams", flush=True)
                storm[kind] = storm_case(
                    kind,
                    args.storm_streams,
                    args.storm_runs,
                    wd=wd,
                    procs=procs,
                    mat=mat,
                    material=material,
                    node_file=node_file,
                    index=index,
                    node_first_only=not args.node_every_request,
                )
        return report(args, info, fan, storm)


def report(
    args: argparse.Namespace,
    info: dict[str, Any],
    fan: dict[str, dict[int, dict[str, Any]]],
    storm: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    targets: list[list[str]] = []
    slopes: dict[str, dict[str, float]] = {}
    if fan["bridge"]:
        rows = []
        for n in sorted(fan["bridge"]):
            f, b = fan["floor"][n], fan["bridge"][n]
            rows.append(
                [
                    n,
                    med(f["last_ms"]),
                    med(b["last_ms"]),
                    ratio(med(b["last_ms"]), med(f["last_ms"])),
                    med(f["cpu_s"]),
                    med(b["cpu_s"]),
                    f["rss_open_kb"] / 1024,
                    b["rss_open_kb"] / 1024,
                    max(b["rss_open_kb"], b["rss_after_kb"]) / 1024,
                    b["hwm_kb"] / 1024,
                    b["open_s"],
                ]
            )
        print("\nOne rotation -> the last of N streams holds the new leaf (median of rotations)")
        print(
            table(
                [
                    "streams",
                    "floor last ms",
                    "bridge last ms",
                    "bridge/floor",
                    "floor CPU s",
                    "bridge CPU s",
                    "floor RSS MB",
                    "bridge RSS MB",
                    "bridge RSS after",
                    "bridge VmHWM",
                    "bridge open s",
                ],
                rows,
            )
        )
        for kind in ("floor", "bridge"):
            pts = sorted(fan[kind].items())
            slopes[kind] = {
                "push_ms_per_stream": slope([(n, med(c["last_ms"])) for n, c in pts]),
                "cpu_ms_per_stream": slope([(n, 1000 * med(c["cpu_s"])) for n, c in pts]),
                "rss_kb_per_stream": slope([(n, c["rss_open_kb"]) for n, c in pts]),
            }
        print("\nSlope per stream (least squares over the counts)")
        print(
            table(
                ["server", "push ms / stream", "CPU ms / stream", "RSS KB / stream"],
                [[k, *v.values()] for k, v in slopes.items()],
            )
        )
        if args.streams in fan["bridge"]:
            n = args.streams
            f, b = fan["floor"][n], fan["bridge"][n]
            last_ratio = ratio(med(b["last_ms"]), med(f["last_ms"]))
            rss_mb = max(b["rss_open_kb"], b["rss_after_kb"]) / 1024
            targets += [
                [
                    f"{n} streams: last <= {TARGET_RATIO}x floor",
                    f"{last_ratio:.2f}x",
                    verdict(last_ratio <= TARGET_RATIO),
                ],
                [
                    f"({n} streams: last <= {TARGET_LAST_S:.0f} s on an idle machine)",
                    f"{med(b['last_ms']):.0f} ms (floor {med(f['last_ms']):.0f} ms)",
                    ABSOLUTE,
                ],
                [
                    f"{n} streams: RSS <= {TARGET_RSS_MB:.0f} MB",
                    f"{rss_mb:.1f} MB (VmHWM {b['hwm_kb'] / 1024:.1f})",
                    verdict(rss_mb <= TARGET_RSS_MB),
                ],
                [
                    f"{n} streams: CPU per push",
                    f"{med(b['cpu_s']):.2f} s (floor {med(f['cpu_s']):.2f} s)",
                    ABSOLUTE,
                ],
            ]
    if storm:
        rows = []
        for kind, c in storm.items():
            rows.append(
                [
                    kind,
                    c["streams"],
                    med(c["first_ms"]),
                    med(c["p50_ms"]),
                    med(c["back_ms"]),
                    max(c["hwm_kb"]) / 1024,
                    c["client"]["reconnect_failures"],
                ]
            )
        print("\nReconnect storm: kill -9 + restart; ms after the new socket is bound (median)")
        print(
            table(
                [
                    "server",
                    "streams",
                    "first back",
                    "p50 back",
                    "all back",
                    "peak RSS MB",
                    "failed reconnects",
                ],
                rows,
            )
        )
        if "bridge" in storm:
            back = med(storm["bridge"]["back_ms"])
            targets += [
                [
                    f"storm, {args.storm_streams} streams: all back <= {TARGET_STORM_S:.0f} s "
                    "after the socket is bound",
                    f"{back:.0f} ms (floor {med(storm['floor']['back_ms']):.0f} ms)",
                    verdict(back <= TARGET_STORM_S * 1000),
                ]
            ]
    print("\nTargets")
    print(table(["target", "measured", "verdict"], targets))
    result = {
        "benchmark": "scale",
        "machine": info,
        "args": vars(args),
        "fanout": {k: {str(n): c for n, c in v.items()} for k, v in fan.items()},
        "slopes": slopes,
        "storm": storm,
        "targets": {row[0]: [row[1], row[2]] for row in targets},
    }
    full = not args.quick and fan["bridge"] and storm and len(fan["bridge"]) > 1
    if full and not args.no_summary:
        _common.write_summary(SUMMARY, PLOT, result, lambda: plot(result))
    return result


def plot(result: dict[str, Any]) -> None:
    """Push time (log-log) and RSS (log-linear) against stream count, bridge and floor."""
    plt = _common.pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"bridge": "#1f77b4", "floor": "#7f7f7f"}
    labels = {"bridge": "bridge (sds run)", "floor": "floor (zero-work SDS)"}
    for kind, cases in result["fanout"].items():
        counts = sorted(int(n) for n in cases)
        last = [med(cases[str(n)]["last_ms"]) for n in counts]
        cpu = [1000 * med(cases[str(n)]["cpu_s"]) for n in counts]
        rss = [cases[str(n)]["rss_open_kb"] / 1024 for n in counts]
        hwm = [cases[str(n)]["hwm_kb"] / 1024 for n in counts]
        left.plot(counts, last, "o-", color=colors[kind], label=f"{labels[kind]}: last stream")
        left.plot(counts, cpu, "x:", color=colors[kind], label=f"{labels[kind]}: CPU per push")
        right.plot(counts, rss, "o-", color=colors[kind], label=f"{labels[kind]}: RSS, all open")
        right.plot(counts, hwm, "x:", color=colors[kind], label=f"{labels[kind]}: VmHWM")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    counts = sorted(int(n) for n in result["fanout"]["bridge"])
    left.set_yscale("log")  # RSS stays linear: it is an offset plus a slope
    left.yaxis.set_major_formatter(ScalarFormatter())
    left.yaxis.set_minor_formatter(NullFormatter())
    right.set_ylim(bottom=0)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(counts, [f"{n:,}" for n in counts])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("SDS streams")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    left.set_ylabel("ms (median of rotations)")
    left.set_title("rotation -> last stream has the new leaf")
    right.set_ylabel("server RSS, MB")
    right.set_title("memory")
    fig.suptitle("one connection per stream; a 61 KB Envoy Node on each first request", fontsize=9)
    code = result["machine"]["code"]
    fig.text(
        0.01,
        0.01,
        f"commit {code['commit']}, {result['machine']['date_utc']}, "
        f"{result['machine']['nproc']} CPU",
        fontsize=7,
        color="#555555",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=100, metadata={"Software": None})  # same JSON -> same bytes
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--streams", type=int, default=None, help="fan-out streams (10,000)")
    parser.add_argument("--sweep", default=None, help="stream counts (100,300,1000,3000,10000)")
    parser.add_argument("--rotations", type=int, default=None, help="measured rotations (3)")
    parser.add_argument("--sweep-rotations", type=int, default=None, help="per sweep count (3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--storm-streams", type=int, default=None, help="storm streams (1,000)")
    parser.add_argument("--storm-runs", type=int, default=None, help="storm repetitions (3)")
    parser.add_argument("--parts", default="fanout,sweep,storm")
    parser.add_argument(
        "--node-every-request",
        action="store_true",
        help="repeat the 61 KB node on every ACK (Envoy's default) instead of the first "
        "request only (set_node_on_first_message_only, as sds envoy-bootstrap sets)",
    )
    parser.add_argument("--no-summary", action="store_true", help="leave docs/bench/ alone")
    parser.add_argument("--plot-only", action="store_true", help="redraw docs/bench/scale.png")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="OUT.prof",
        help="cProfile the bridge's measured fan-out rotations; keep the pstats file here",
    )
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(SUMMARY.read_text()))
        print(f"plot: {PLOT.relative_to(_common.REPO)}")
        return 0
    if args.streams is None:
        args.streams = 300 if args.quick else 10_000
    args.sweep = [
        int(x) for x in (args.sweep or ("30,100" if args.quick else "100,300,1000,3000")).split(",")
    ]
    if args.rotations is None:
        args.rotations = 3
    if args.sweep_rotations is None:
        args.sweep_rotations = 3
    if args.storm_streams is None:
        args.storm_streams = 200 if args.quick else 1000
    if args.storm_runs is None:
        args.storm_runs = 3
    return run_benchmark("scale", run, args)


if __name__ == "__main__":
    sys.exit(main())
