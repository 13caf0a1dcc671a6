"""Ghostunnel vs bridge + Envoy as the mTLS front of one plain app: latency, RSS, rotation.

One provider (``sds workload-api``, the server SVID ``web`` with a short TTL
so it rotates during the run, the client SVID ``client-a`` for an hour) feeds
three fronts of the same plain-HTTP app (``gopeers app``, Go net/http):

* ``ghostunnel``: Ghostunnel server mode, ``--use-workload-api-addr``
  on the provider, ``--allow-uri`` the client (an L4 proxy);
* ``envoy-http``: ``sds run`` + Envoy from ``sds envoy-bootstrap --inbound``
  (HTTP connection manager, RBAC, XFCC: L7);
* ``envoy-tcp``: the same bridge + Envoy with ``--protocol tcp`` (TCP proxy),
  which separates Envoy's L7 cost from what the bridge and SDS add.

The client is ``gopeers load`` (go-spiffe tlsconfig over net/http, its SVID
from the same provider) for every front: new connections (a full mTLS
handshake per request) and keep-alive (one connection per worker), at c=1
and c=8, each for ``--duration`` seconds, ``--repeats`` times interleaved;
reported as medians over the repeats. Then RSS of each side, and a rotation
phase: the three fronts loaded at once for ``--rotation-seconds`` while the
server SVID is re-issued, counting failed requests and the leaf serials seen.

Both Go programs and Ghostunnel are built (once, cached) by tests/harness/gobuild.py.

    .venv/bin/python bench/peers.py [--quick]        # ~3 min (--quick ~1 min)

A full run rewrites docs/bench/peers.json (the summary BENCHMARKS.md cites, committed)
and docs/bench/peers.png; the raw runs go to bench/results/ (gitignored).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from _common import (
    REPO,
    Procs,
    machine,
    machine_line,
    pyplot,
    ratio,
    rss_kb,
    run_benchmark,
    sds_argv,
    table,
    wait_until,
    workspace,
    write_summary,
)

from sds.tools import bootstrap as _bootstrap
from tests.harness import gobuild
from tests.harness.envoy import Envoys
from tests.harness.stack import identities_yaml

FRONTS = ("ghostunnel", "envoy-http", "envoy-tcp")
MODES = (("new", False), ("keep-alive", True))
WORKERS = (1, 8)
TD = "spiffe://example.org"
WEB, CLIENT = f"{TD}/web", f"{TD}/client-a"
SUMMARY = REPO / "docs" / "bench" / "peers.json"
PLOT = REPO / "docs" / "bench" / "peers.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat of 2 s, 12 s rotation")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per load run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rotation-seconds", type=float, default=25.0)
    parser.add_argument("--x509-ttl", default="20s", help="server SVID TTL (re-issued at half)")
    parser.add_argument("--envoy-concurrency", type=int, default=2, help="Envoy worker threads")
    parser.add_argument("--no-summary", action="store_true", help="do not rewrite the summary")
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw the plot from the committed summary"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.repeats, args.rotation_seconds = 2.0, 1, 12.0
    return args


def listening_port(procs: Procs, proc: subprocess.Popen[bytes], what: str) -> int:
    def port() -> int | None:
        for line in procs.log(proc).splitlines():
            if line.startswith("{") and "listening" in line:
                return int(json.loads(line)["listening"].rsplit(":", 1)[1])
        return None

    found: int = wait_until(port, 30, what, proc)
    return found


def generate(*argv: str) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    _bootstrap.add_arguments(parser)
    options = _bootstrap.options_from_args(parser.parse_args(list(argv)))
    config: dict[str, Any] = yaml.safe_load(_bootstrap.render_bootstrap(options))
    return config


class Scene:
    """Provider, app, Ghostunnel, bridge and both Envoys of one run."""

    def __init__(self, ws: Path, procs: Procs, args: argparse.Namespace) -> None:
        self.ws, self.procs, self.args = ws, procs, args
        self.gopeers = gobuild.gopeers_binary()
        self.ghostunnel_bin = gobuild.ghostunnel_binary()
        self.workload = ws / "workload.sock"
        self.sds_socket = ws / "sds" / "sds.sock"
        self.envoys = Envoys(ws / "envoy")
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}

    def start(self) -> None:
        ws, procs = self.ws, self.procs
        identities = ws / "identities.yaml"
        identities.write_text(identities_yaml(("web", "client-a")))
        provider = procs.start(
            sds_argv(
                "workload-api",
                "--socket",
                str(self.workload),
                "--trust-domain",
                "example.org",
                "--identities",
                str(identities),
                "--ephemeral",
                "--x509-ttl",
                self.args.x509_ttl,
            ),
            "provider",
        )
        wait_until(self.workload.exists, 30, "provider socket", provider)
        app = procs.start([str(self.gopeers), "app"], "app")
        app_port = listening_port(procs, app, "app listening")

        listener = gobuild.loopback_listener()
        argv, kwargs = gobuild.ghostunnel_argv(
            self.ghostunnel_bin,
            listener,
            workload_socket=self.workload,
            target_port=app_port,
            allow_uris=[CLIENT],
        )
        ghostunnel = procs.start(argv, "ghostunnel", **kwargs)
        self.ports["ghostunnel"] = listener.getsockname()[1]
        listener.close()
        self.pids["ghostunnel"] = ghostunnel.pid

        base = ["--sds-socket", str(self.sds_socket), "--admin-port", "0"]
        base += ["--inbound", f"0:127.0.0.1:{app_port}", "--inbound-address", "127.0.0.1"]
        base += ["--allow", CLIENT]
        snippet = ws / "policy.yaml"
        parser = argparse.ArgumentParser()
        _bootstrap.add_arguments(parser)
        written = ws / "generated.yaml"
        gen_args = parser.parse_args(
            ["--node-id", "x", *base, "--bridge-config", str(snippet), "-o", str(written)]
        )
        if _bootstrap.run(gen_args) != 0:
            raise RuntimeError("sds envoy-bootstrap failed")
        config = {
            "workload_api": f"unix://{self.workload}",
            "listen": f"unix://{self.sds_socket}",
            "admin": "127.0.0.1:0",
            "policies": yaml.safe_load(snippet.read_text())["policies"],
        }
        (ws / "sds.yaml").write_text(yaml.safe_dump(config))
        bridge = procs.start(sds_argv("run", "--config", str(ws / "sds.yaml")), "bridge")
        wait_until(self.sds_socket.exists, 30, "bridge socket", bridge)
        self.pids["bridge"] = bridge.pid
        for front, extra in (("envoy-http", []), ("envoy-tcp", ["--protocol", "tcp"])):
            envoy = self.envoys.start(
                generate("--node-id", front, *base, *extra),
                name=front,
                concurrency=self.args.envoy_concurrency,
                log_level="warning",
            )
            self.ports[front] = envoy.listener_port("inbound")
            self.pids[front] = envoy.pid

    def close(self) -> None:
        self.envoys.close()

    def load_argv(self, front: str, workers: int, keep_alive: bool, seconds: float) -> list[str]:
        argv = [str(self.gopeers), "load", "-addr", f"unix://{self.workload}"]
        argv += ["-hint", "client-a", "-server-id", WEB]
        argv += ["-url", f"https://127.0.0.1:{self.ports[front]}/"]
        argv += ["-c", str(workers), "-duration", f"{seconds}s"]
        if keep_alive:
            argv.append("-keep-alive")
        return argv

    def load(self, front: str, workers: int, keep_alive: bool, seconds: float) -> dict[str, Any]:
        result = subprocess.run(
            self.load_argv(front, workers, keep_alive, seconds),
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"gopeers load {front}: {result.stderr.strip()[-2000:]}")
        line: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
        return line

    def rotation(self, seconds: float) -> dict[str, dict[str, Any]]:
        """All three fronts under c=1 new-connection load at once while ``web`` rotates."""
        running = {
            front: subprocess.Popen(
                self.load_argv(front, 1, False, seconds),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for front in FRONTS
        }
        out: dict[str, dict[str, Any]] = {}
        for front, proc in running.items():
            stdout, stderr = proc.communicate(timeout=seconds + 60)
            if proc.returncode != 0:
                raise RuntimeError(f"gopeers load {front}: {stderr.strip()[-2000:]}")
            out[front] = json.loads(stdout.strip().splitlines()[-1])
        return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    print(machine_line(info))
    with workspace("sdsb-peers-") as ws:
        procs = Procs(ws)
        scene = Scene(ws, procs, args)
        try:
            scene.start()
            for front in FRONTS:  # warm-up: the fronts have their SVIDs and the paths work
                warm = wait_until(
                    lambda f=front: (r := scene.load(f, 1, True, 0.5))["requests"] and r,
                    60,
                    f"{front} serving",
                )
                if warm["failures"]:
                    print(f"[bench] {front} warm-up failures: {warm['errors']}", file=sys.stderr)
            runs: list[dict[str, Any]] = []
            for repeat in range(args.repeats):
                for mode, keep_alive in MODES:
                    for workers in WORKERS:
                        for front in FRONTS:
                            result = scene.load(front, workers, keep_alive, args.duration)
                            result.update(front=front, mode=mode, repeat=repeat)
                            runs.append(result)
                            print(
                                f"  {front:10} {mode:10} c={workers} p50 "
                                f"{result['p50_ms']:.2f} ms {result['rps']:.0f} req/s "
                                f"failures {result['failures']}",
                                flush=True,
                            )
            rss = {name: rss_kb(pid) for name, pid in scene.pids.items()}
            rotation = scene.rotation(args.rotation_seconds)
        finally:
            scene.close()
            procs.close()
    return report(args, info, runs, rss, rotation)


def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """(mode, c, front) -> median p50/p90/p99 and req/s over the repeats."""
    out: dict[str, dict[str, float]] = {}
    for mode, _ in MODES:
        for workers in WORKERS:
            for front in FRONTS:
                mine = [
                    r
                    for r in runs
                    if r["mode"] == mode and r["workers"] == workers and r["front"] == front
                ]
                out[f"{mode} c={workers} {front}"] = {
                    key: statistics.median(r[key] for r in mine)
                    for key in ("p50_ms", "p90_ms", "p99_ms", "rps")
                } | {"failures": sum(r["failures"] for r in mine)}
    return out


def report(
    args: argparse.Namespace,
    info: dict[str, Any],
    runs: list[dict[str, Any]],
    rss: dict[str, int],
    rotation: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    med = medians(runs)
    rows = []
    for mode, _ in MODES:
        for workers in WORKERS:
            g, h, t = (med[f"{mode} c={workers} {f}"] for f in FRONTS)
            rows.append(
                [
                    f"{mode}, c={workers}",
                    g["p50_ms"],
                    h["p50_ms"],
                    t["p50_ms"],
                    ratio(h["p50_ms"], g["p50_ms"]),
                    ratio(t["p50_ms"], g["p50_ms"]),
                    g["rps"],
                    h["rps"],
                    t["rps"],
                    ratio(h["rps"], g["rps"]),
                ]
            )
    headers = [
        "load",
        "GT p50 ms",
        "Envoy-HTTP p50",
        "Envoy-TCP p50",
        "HTTP/GT",
        "TCP/GT",
        "GT req/s",
        "HTTP req/s",
        "TCP req/s",
        "HTTP/GT req/s",
    ]
    print("\n" + table(headers, rows))
    rss_mb = {k: v / 1024 for k, v in rss.items()}
    envoy_side = rss_mb["bridge"] + rss_mb["envoy-http"]
    print(
        "\n"
        + table(
            ["process", "RSS MB"],
            [
                ["Ghostunnel", rss_mb["ghostunnel"]],
                ["bridge (sds run)", rss_mb["bridge"]],
                ["Envoy (HTTP front)", rss_mb["envoy-http"]],
                ["Envoy (TCP front)", rss_mb["envoy-tcp"]],
                ["bridge + Envoy HTTP", envoy_side],
                ["(bridge + Envoy) / Ghostunnel", ratio(envoy_side, rss_mb["ghostunnel"])],
            ],
        )
    )
    rot_rows = [
        [f, r["requests"], r["failures"], len(r["serials"]) - 1, "; ".join(r["errors"])[:80]]
        for f, r in rotation.items()
    ]
    print(
        f"\nrotation: {args.rotation_seconds:.0f} s, server SVID TTL {args.x509_ttl}\n"
        + table(["front", "requests", "failed", "rotations seen", "errors"], rot_rows)
    )
    result = {
        "benchmark": "peers",
        "machine": info,
        "versions": {
            "ghostunnel": gobuild.GHOSTUNNEL_VERSION,
            "go_spiffe": gobuild.GO_SPIFFE_VERSION,
            "go": gobuild.go_version(),
        },
        "settings": {
            "duration_s": args.duration,
            "repeats": args.repeats,
            "rotation_s": args.rotation_seconds,
            "x509_ttl": args.x509_ttl,
            "envoy_concurrency": args.envoy_concurrency,
            "command": "bench/peers.py" + (" --quick" if args.quick else ""),
        },
        "medians": med,
        "rss_mb": rss_mb,
        "rotation": {
            f: {
                "requests": r["requests"],
                "failures": r["failures"],
                "rotations_seen": len(r["serials"]) - 1,
                "errors": r["errors"],
            }
            for f, r in rotation.items()
        },
        "runs": runs,
    }
    if not args.no_summary:
        summary = {k: v for k, v in result.items() if k != "runs"}
        write_summary(SUMMARY, PLOT, summary, lambda: plot(med, rss_mb))
    return result


def plot(med: dict[str, dict[str, float]], rss_mb: dict[str, float]) -> None:
    """p50 latency per load and front, and RSS per side, as one PNG (matplotlib, Agg)."""
    plt = pyplot()
    if plt is None:
        return
    labels = [f"{m}\nc={c}" for m, _ in MODES for c in WORKERS]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.27
    names = {"ghostunnel": "Ghostunnel", "envoy-http": "bridge + Envoy (HTTP)"}
    names["envoy-tcp"] = "bridge + Envoy (TCP proxy)"
    for i, front in enumerate(FRONTS):
        values = [med[f"{m} c={c} {front}"]["p50_ms"] for m, _ in MODES for c in WORKERS]
        xs = [x + (i - 1) * width for x in range(len(labels))]
        left.bar(xs, values, width, label=names[front])
    left.set_xticks(range(len(labels)), labels)
    left.set_yscale("log")
    left.set_ylabel("p50 latency per request, ms (log; median of repeats)")
    left.set_title("mTLS front of one plain app")
    left.legend(fontsize=8)
    sides = ["Ghostunnel", "bridge", "Envoy HTTP"]
    values = [rss_mb["ghostunnel"], rss_mb["bridge"], rss_mb["envoy-http"]]
    right.bar([0], [values[0]], color="C0")
    right.bar([1], [values[1]], color="C1", label="bridge (sds run)")
    right.bar([1], [values[2]], bottom=[values[1]], color="C2", label="Envoy")
    right.set_xticks([0, 1], [sides[0], "bridge + Envoy"])
    right.set_ylabel("RSS after the load, MB")
    right.legend(fontsize=8)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=100, metadata={"Software": None})  # same JSON -> same bytes
    plt.close(fig)


def main() -> int:
    args = parse_args()
    if args.plot_only:
        saved = json.loads(SUMMARY.read_text())
        plot(saved["medians"], saved["rss_mb"])
        print(f"plot: {PLOT.relative_to(REPO)}")
        return 0
    return run_benchmark("peers", run, args)


if __name__ == "__main__":
    sys.exit(main())
