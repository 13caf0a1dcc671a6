"""Footprint of ``sds run``: idle RSS and CPU, start-up time to the first secret, import costs.

Usage: ``.venv/bin/python bench/footprint.py [--quick] [--runs N] [--idle SECONDS]``

Upstream is the real embedded provider (``sds workload-api``, ephemeral CA,
one identity ``web``). Measured in one run:

1. **Start-up**, N times (default 7): T0 just before ``exec`` of
   ``python -m sds run``; a waiting SDS client in this process polls for the
   socket, opens StreamSecrets for ``default`` and stops the clock at the
   first response. Phases are read from the bridge's log timestamps. The
   baselines are ``python -c pass`` and ``python -S -c pass`` (interpreter
   start-up with and without site) measured alike: the floor.
2. **Idle**: ``sds run`` serving one real Envoy (``default`` + ``ROOTCA``):
   VmRSS (and RssAnon/RssFile), then CPU (utime+stime from /proc/<pid>/stat)
   and context switches over an idle window (default 30 s). Compared in the
   same run with a bare ``python -c 'import asyncio; asyncio.run(sleep)'``,
   the embedded provider, and the zero-work SDS floor serving its own Envoy.
   A second ``sds run --admin off`` serves its own Envoy: with no listener
   serving /metrics it never loads prometheus_client.
3. **Where memory goes**: VmRSS of fresh interpreters importing the
   bridge's dependencies cumulatively, one group more per row.
Before measuring, ``sds/`` is byte-compiled (as an installed package is), so
no start compiles source.

4. **Where start-up time goes**: ``python -X importtime`` of one ``sds run``
   start, aggregated per top-level package, plus the slowest modules.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import re
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
    SDS_SERVICE,
    Prober,
    Procs,
    RawCodec,
    cpu_ticks,
    discovery_request,
    machine,
    machine_line,
    make_material,
    ratio,
    read_line,
    rss_breakdown_kb,
    rss_kb,
    run_benchmark,
    sds_argv,
    summary,
    table,
    thread_wakeups,
    verdict,
    wait_until,
    workspace,
)

from tests.harness.envoy import Envoys, bootstrap, downstream_mtls_listener, sds_cluster
from tests.harness.stack import identities_yaml

TARGET_RSS_MB = 36.0  # issue 13: serving one Envoy
# Issue 13's target is "exec -> first secret <= 150 ms p50" on an idle 2-vCPU machine,
# where `python -c pass` takes ~25 ms: 6x the bare interpreter start. A shared,
# loaded machine slows both alike, so the verdict is that ratio against the
# interpreter start measured in the same run; the absolute time is printed beside it.
TARGET_FIRST_S = 0.150
REFERENCE_PYTHON_START_MS = 25.0
TARGET_FIRST_RATIO = TARGET_FIRST_S * 1000 / REFERENCE_PYTHON_START_MS

# What `sds run` imports before serving, whatever its config (tests/integration/test_lazy_imports.py
# holds it to that): prometheus_client comes only with a /metrics listener, yaml only
# with --config.
SDS_RUN_MODULES = (
    "sds.workloadapi.client, sds.workloadapi.watcher, sds.xds.service, sds.bridge.state, "
    "sds.bridge.jwtsvids, sds.bridge.config, sds.bridge.admin, sds.bridge.app, sds.xds.codec, "
    "sds.cli, sds.bridge.root, sds.bridge.views, sds._util.tasks"
)

# Cumulative import steps: (label, statements added to the previous step, package): a step
# naming a package is kept only if `sds run` really loads that package.
IMPORT_STEPS: list[tuple[str, str, str | None]] = [
    ("python (no imports)", "pass", None),
    ("+ asyncio, logging, argparse", "import asyncio, logging, argparse, json, ssl", None),
    ("+ grpclib client+server (h2)", "import grpclib.client, grpclib.server", None),
    ("+ cryptography (x509, ec)", "import sds.spiffe.x509, sds.spiffe.jwt", None),
    (
        "+ protobuf + Workload API stubs",
        "import sds._proto.workload_pb2, sds._proto.workload_grpc",
        None,
    ),
    ("+ config parser (no yaml)", "import sds.bridge.config", None),
    ("+ grpcio (envoy_data_plane's discovery.v3 imports it)", "import grpc", "grpc"),
    (
        "+ envoy_data_plane messages",
        "import envoy_data_plane.envoy.extensions.transport_sockets.tls.v3, "
        "envoy_data_plane.envoy.service.discovery.v3",
        "envoy_data_plane",
    ),
    ("+ rest of sds run, --admin off (= everything it loads)", "import " + SDS_RUN_MODULES, None),
    ("+ prometheus_client (admin or metrics listener on)", "import sds.bridge.metrics", None),
    ("+ yaml (only with --config)", "import yaml", None),
]


def loaded_by_sds_run() -> set[str]:
    """Top-level packages present in sys.modules after importing what ``sds run`` imports."""
    code = f"import sys, {SDS_RUN_MODULES}; print(*{{m.split('.')[0] for m in sys.modules}})"
    out = subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, check=True, cwd=_common.REPO
    )
    return set(out.stdout.split())


async def wait_first_secret(sock: Path, proc: Any, limit: float = 30.0) -> float:
    """Poll for ``sock``, fetch ``default`` over StreamSecrets; monotonic time of the answer."""
    from grpclib.client import Channel
    from grpclib.const import Cardinality

    deadline = time.monotonic() + limit
    request = discovery_request(["default"], node_id="startup-probe")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sds run exited with {proc.returncode}")
        if not os.path.exists(sock):  # noqa: ASYNC240 - one stat per millisecond, on purpose
            await asyncio.sleep(0.001)
            continue
        channel = Channel(path=str(sock), codec=RawCodec())
        try:
            async with channel.request(
                f"{SDS_SERVICE}/StreamSecrets", Cardinality.STREAM_STREAM, bytes, bytes
            ) as stream:
                await stream.send_message(request)
                raw = await stream.recv_message()
                answered = time.monotonic()
                await stream.cancel()
            if raw:
                return answered
        except Exception:  # not listening yet (refused, reset, protocol error): retry
            await asyncio.sleep(0.001)
        finally:
            channel.close()
    raise RuntimeError(f"no secret within {limit}s")


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z \w+ \S+ (\S+)")


def log_phases(text: str, t0_wall: float) -> dict[str, float]:
    """Milliseconds from exec to the first log line of each start-up event."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _LOG_TIME.match(line)
        if not match:
            continue
        stamp = dt.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=dt.UTC)
        out.setdefault(match.group(2), (stamp.timestamp() - t0_wall) * 1000)
    return out


def bridge_args(provider_sock: Path, sock: Path, admin: str = "127.0.0.1:0") -> list[str]:
    return [
        "run",
        "--workload-api",
        f"unix://{provider_sock}",
        "--listen",
        f"unix://{sock}",
        "--admin",
        admin,
    ]


def startup_runs(
    procs: Procs, wd: Path, provider_sock: Path, runs: int
) -> tuple[list[float], list[dict[str, float]]]:
    firsts: list[float] = []
    phases: list[dict[str, float]] = []
    for i in range(runs):
        sock = wd / f"s{i}" / "sds.sock"
        t0_wall = time.time()
        t0 = time.monotonic()
        proc = procs.start(sds_argv(*bridge_args(provider_sock, sock)), f"startup-{i}")
        t1 = asyncio.run(wait_first_secret(sock, proc))
        firsts.append((t1 - t0) * 1000)
        procs.stop(proc)
        phases.append(log_phases(procs.log(proc), t0_wall))
        time.sleep(0.2)
    return firsts, phases


def interpreter_startup(runs: int, *flags: str) -> dict[str, float]:
    samples = []
    for _ in range(runs):
        t0 = time.monotonic()
        subprocess.run([PYTHON, *flags, "-c", "pass"], check=True)
        samples.append((time.monotonic() - t0) * 1000)
    return summary(samples)


def import_time(procs: Procs, wd: Path, provider_sock: Path) -> dict[str, Any]:
    """One ``sds run`` start under ``-X importtime``; aggregate per top-level package."""
    sock = wd / "imp" / "sds.sock"
    proc = procs.start(
        [PYTHON, "-X", "importtime", "-m", "sds", *bridge_args(provider_sock, sock)],
        "importtime",
    )
    asyncio.run(wait_first_secret(sock, proc))
    procs.stop(proc)
    per_pkg: dict[str, float] = {}
    modules: list[tuple[float, float, str]] = []
    top_level: list[tuple[float, str]] = []
    for line in procs.log(proc).splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _, rest = line.split(":", 1)
        self_us, cumulative_us, name = rest.split("|", 2)
        depth = (len(name) - len(name.lstrip())) // 2
        module = name.strip()
        self_ms = int(self_us) / 1000
        cum_ms = int(cumulative_us) / 1000
        per_pkg[module.split(".")[0]] = per_pkg.get(module.split(".")[0], 0.0) + self_ms
        modules.append((self_ms, cum_ms, module))
        if depth == 0:
            top_level.append((cum_ms, module))
    total = sum(per_pkg.values())
    return {
        "total_ms": total,
        "per_package_ms": dict(sorted(per_pkg.items(), key=lambda kv: -kv[1])),
        "slowest_self_ms": sorted(modules, reverse=True)[:15],
        "top_level_cumulative_ms": sorted(top_level, reverse=True)[:15],
    }


def import_rss() -> list[dict[str, Any]]:
    """VmRSS of a fresh interpreter after each cumulative import step."""
    rows = []
    statements: list[str] = []
    previous = 0
    loaded = loaded_by_sds_run()
    for label, stmt, optional in IMPORT_STEPS:
        if optional is not None and optional not in loaded:
            continue  # this checkout's sds run does not load it
        statements.append(stmt)
        code = "; ".join(statements) + (
            "; import os, time, gc; gc.collect()"
            "; f = open(f'/proc/{os.getpid()}/status').read()"
            "; print(*(l.split()[1] for l in f.splitlines() if l.split(':')[0] in "
            "('VmRSS', 'RssAnon', 'RssFile')))"
        )
        start = time.monotonic()
        out = subprocess.run(
            [PYTHON, "-c", code], capture_output=True, text=True, check=True, cwd=_common.REPO
        ).stdout.split()
        elapsed = (time.monotonic() - start) * 1000
        rss, anon, file_ = (int(x) for x in out)
        rows.append(
            {
                "step": label,
                "rss_mb": rss / 1024,
                "delta_mb": (rss - previous) / 1024 if previous else rss / 1024,
                "anon_mb": anon / 1024,
                "file_mb": file_ / 1024,
                "wall_ms": elapsed,
            }
        )
        previous = rss
    return rows


def idle_window(pids: dict[str, int], seconds: float) -> dict[str, dict[str, float]]:
    before = {k: (cpu_ticks(p), thread_wakeups(p)) for k, p in pids.items()}
    time.sleep(seconds)
    out = {}
    for k, p in pids.items():
        ticks = cpu_ticks(p) - before[k][0]
        out[k] = {
            "cpu_s": ticks / CLK_TCK,
            "cpu_pct": 100 * ticks / CLK_TCK / seconds,
            "ctx_switches": thread_wakeups(p) - before[k][1],
        }
    return out


def compile_sources() -> None:
    """Byte-compile ``sds/`` as ``pip install`` does for an installed package.

    A checkout run with PYTHONDONTWRITEBYTECODE=1 (or from a read-only tree) has no
    ``__pycache__``, and every start would compile each module from source first:
    ~50 ms and ~2 MB that no installed bridge pays.
    """
    import compileall

    compileall.compile_dir(str(_common.REPO / "sds"), quiet=1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    print(machine_line(info), flush=True)
    compile_sources()
    with workspace() as wd, Procs(wd) as procs, Envoys(wd / "envoy") as envoys:
        return _run(args, info, wd, procs, envoys)


def _run(
    args: argparse.Namespace, info: dict[str, Any], wd: Path, procs: Procs, envoys: Envoys
) -> dict[str, Any]:
    identities = wd / "identities.yaml"
    identities.write_text(identities_yaml(("web",)))
    provider_sock = wd / "workload.sock"
    provider = procs.start(
        sds_argv(
            "workload-api",
            "--socket",
            str(provider_sock),
            "--trust-domain",
            "example.org",
            "--identities",
            str(identities),
            "--ephemeral",
            "--x509-ttl",
            "1h",
        ),
        "provider",
    )
    wait_until(provider_sock.exists, 30, "provider socket", provider)

    print(f"start-up: {args.runs} runs of sds run -> first secret", flush=True)
    python_start = interpreter_startup(args.runs)
    python_s_start = interpreter_startup(args.runs, "-S")
    firsts, phases = startup_runs(procs, wd, provider_sock, args.runs)
    print("import-time profile of one start", flush=True)
    imports = import_time(procs, wd, provider_sock)

    print("idle: sds run serving one Envoy", flush=True)
    sock = wd / "b" / "sds.sock"
    bridge = procs.start(sds_argv(*bridge_args(provider_sock, sock)), "bridge")
    wait_until(sock.exists, 30, "bridge socket", bridge)
    envoy = envoys.start(
        bootstrap(
            "idle-envoy", "bench", [downstream_mtls_listener("in")], [sds_cluster("sds", sock)]
        ),
        log_level="warning",
        name="envoy-bridge",
    )
    material = wd / "material.json"
    mat = make_material(material, 1)
    floor_sock = wd / "f" / "sds.sock"
    floor_sock.parent.mkdir(mode=0o700)
    floor = procs.start(
        [
            PYTHON,
            str(BENCH / "_floor.py"),
            "--socket",
            str(floor_sock),
            "--material",
            str(material),
        ],
        "floor",
        stdin=True,
        stdout=True,
    )
    read_line(floor, 30, "floor ready")
    floor_envoy = envoys.start(
        bootstrap(
            "idle-floor",
            "bench",
            [downstream_mtls_listener("in")],
            [sds_cluster("sds", floor_sock)],
        ),
        log_level="warning",
        name="envoy-floor",
    )
    lean_sock = wd / "lean" / "sds.sock"
    lean = procs.start(sds_argv(*bridge_args(provider_sock, lean_sock, "off")), "bridge-lean")
    wait_until(lean_sock.exists, 30, "bridge (--admin off) socket", lean)
    envoys.start(
        bootstrap(
            "idle-lean", "bench", [downstream_mtls_listener("in")], [sds_cluster("sds", lean_sock)]
        ),
        log_level="warning",
        name="envoy-lean",
    )
    prober = Prober(mat["ca_pem"], mat["client_cert"], mat["client_key"], wd)
    if prober.leaf_der(floor_envoy.listener_port("in")) != mat["leaf_der"][0]:
        raise RuntimeError("floor Envoy does not serve the floor's secret")
    del envoy
    bare = procs.start(
        [
            PYTHON,
            "-c",
            "import asyncio, sys; print('ready', flush=True); asyncio.run(asyncio.sleep(3600))",
        ],
        "bare-python",
        stdout=True,
    )
    assert bare.stdout is not None
    bare.stdout.readline()
    time.sleep(2.0)
    pids = {
        "sds run (1 Envoy)": bridge.pid,
        "sds run --admin off (1 Envoy)": lean.pid,
        "sds workload-api (provider)": provider.pid,
        "floor SDS (1 Envoy)": floor.pid,
        "bare python asyncio": bare.pid,
    }
    rss = {k: {"rss_kb": rss_kb(p), **rss_breakdown_kb(p)} for k, p in pids.items()}
    print(f"idle window: {args.idle:.0f} s", flush=True)
    idle = idle_window(pids, args.idle)
    rss_after = {k: rss_kb(p) for k, p in pids.items()}
    print("import RSS steps", flush=True)
    steps = import_rss()
    return report(
        args,
        info,
        python_start=python_start,
        python_s_start=python_s_start,
        firsts=firsts,
        phases=phases,
        imports=imports,
        rss=rss,
        rss_after=rss_after,
        idle=idle,
        steps=steps,
    )


def report(
    args: argparse.Namespace,
    info: dict[str, Any],
    *,
    python_start: dict[str, float],
    python_s_start: dict[str, float],
    firsts: list[float],
    phases: list[dict[str, float]],
    imports: dict[str, Any],
    rss: dict[str, dict[str, int]],
    rss_after: dict[str, int],
    idle: dict[str, dict[str, float]],
    steps: list[dict[str, Any]],
) -> dict[str, Any]:
    first = summary(firsts)
    events = [
        "admin.listening",
        "bridge.starting",
        "workload_api.connected",
        "bridge.ready",
        "sds.listening",
    ]
    phase_med = {e: summary([p[e] for p in phases if e in p])["p50"] for e in events}
    print(f"\nStart-up: exec of `sds run` -> first secret served (ms, n={first['n']})")
    rows = [
        ["python -S -c pass (no site)", python_s_start["p50"], python_s_start["p99"], 1.0],
        ["python -c pass (interpreter only)", python_start["p50"], python_start["p99"], 1.0],
    ]
    rows[0][3] = ratio(python_s_start["p50"], python_start["p50"])
    rows.append(
        [
            "sds run -> first secret",
            first["p50"],
            first["p99"],
            ratio(first["p50"], python_start["p50"]),
        ]
    )
    print(table(["what", "p50", "p99", "x python start"], rows))
    print("\nStart-up phases (ms since exec; bridge log timestamps, 1 ms resolution, median)")
    print(
        table(
            ["log event", "ms"],
            [[e, v] for e, v in phase_med.items()] + [["first secret at client", first["p50"]]],
        )
    )
    print(
        f"\nImport time of one `sds run` start (-X importtime): {imports['total_ms']:.0f} ms total"
    )
    per_pkg = list(imports["per_package_ms"].items())[:12]
    print(table(["top-level package", "self ms (sum)"], per_pkg))
    print("\nSlowest single modules (self ms, cumulative ms)")
    print(
        table(
            ["module", "self", "cumulative"],
            [[m, s, c] for s, c, m in imports["slowest_self_ms"][:10]],
        )
    )

    base = rss["bare python asyncio"]["rss_kb"]
    print(f"\nIdle processes (RSS MB; CPU and context switches over {args.idle:.0f} s)")
    rows = []
    for name, values in rss.items():
        rows.append(
            [
                name,
                values["rss_kb"] / 1024,
                values["RssAnon"] / 1024,
                values["RssFile"] / 1024,
                ratio(values["rss_kb"], base),
                rss_after[name] / 1024,
                idle[name]["cpu_s"],
                idle[name]["cpu_pct"],
                idle[name]["ctx_switches"],
            ]
        )
    print(
        table(
            [
                "process",
                "RSS",
                "anon",
                "file",
                "x bare python",
                "RSS after idle",
                "CPU s",
                "CPU %",
                "ctx switches",
            ],
            rows,
        )
    )
    print("\nRSS of a fresh interpreter importing the bridge's dependencies cumulatively (MB)")
    print(
        table(
            ["step", "RSS", "delta", "anon", "file", "wall ms"],
            [
                [s["step"], s["rss_mb"], s["delta_mb"], s["anon_mb"], s["file_mb"], s["wall_ms"]]
                for s in steps
            ],
        )
    )
    bridge_rss_mb = rss["sds run (1 Envoy)"]["rss_kb"] / 1024
    lean_rss_mb = rss["sds run --admin off (1 Envoy)"]["rss_kb"] / 1024
    bridge_cpu = idle["sds run (1 Envoy)"]
    first_ratio = ratio(first["p50"], python_start["p50"])
    targets = [
        [
            f"idle RSS <= {TARGET_RSS_MB:.0f} MB (admin on, the default)",
            f"{bridge_rss_mb:.1f} MB",
            verdict(bridge_rss_mb <= TARGET_RSS_MB),
        ],
        [
            f"idle RSS <= {TARGET_RSS_MB:.0f} MB (--admin off)",
            f"{lean_rss_mb:.1f} MB",
            verdict(lean_rss_mb <= TARGET_RSS_MB),
        ],
        [
            "idle CPU ~0 (no polling)",
            f"{bridge_cpu['cpu_s']:.2f} s / {args.idle:.0f} s, "
            f"{bridge_cpu['ctx_switches']} switches",
            verdict(bridge_cpu["cpu_pct"] < 0.5),
        ],
        [
            f"exec -> first secret <= {TARGET_FIRST_RATIO:.0f}x `python -c pass` "
            f"({TARGET_FIRST_S * 1000:.0f} ms at {REFERENCE_PYTHON_START_MS:.0f} ms)",
            f"{first_ratio:.1f}x: {first['p50']:.0f} ms (p99 {first['p99']:.0f}) "
            f"against {python_start['p50']:.1f} ms",
            verdict(first_ratio <= TARGET_FIRST_RATIO),
        ],
        [
            f"(exec -> first secret <= {TARGET_FIRST_S * 1000:.0f} ms p50 on an idle machine)",
            f"{first['p50']:.0f} ms; floor: python -c pass {python_start['p50']:.0f} ms, "
            f"-S {python_s_start['p50']:.0f} ms",
            ABSOLUTE,
        ],
    ]
    print("\nTargets")
    print(table(["target", "measured", "verdict"], targets))
    return {
        "benchmark": "footprint",
        "machine": info,
        "args": vars(args),
        "python_start_ms": python_start,
        "python_s_start_ms": python_s_start,
        "first_secret_ms": first,
        "startup_phases_ms": phase_med,
        "importtime": imports,
        "idle_rss_kb": rss,
        "rss_after_idle_kb": rss_after,
        "idle": idle,
        "import_rss_steps": steps,
        "targets": {row[0]: [row[1], row[2]] for row in targets},
        "raw": {"first_secret_ms": firsts, "phases": phases},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 start-ups, 10 s idle window")
    parser.add_argument("--runs", type=int, default=None, help="start-up runs (default 7)")
    parser.add_argument("--idle", type=float, default=None, help="idle window seconds (default 30)")
    args = parser.parse_args()
    if args.runs is None:
        args.runs = 3 if args.quick else 7
    if args.idle is None:
        args.idle = 10.0 if args.quick else 30.0
    return run_benchmark("footprint", run, args)


if __name__ == "__main__":
    sys.exit(main())
