"""Chaos under continuous mTLS traffic through a real Envoy (issue 9 item 12, long runs).

Setup: ``sds workload-api``, ``sds run`` and one Envoy terminating mTLS with
``default``/``ROOTCA``; a client makes a new TLS connection (full handshake) every 20 ms
and counts every failed request. Phases:

1. ``restarts``: ``--restarts`` (20) provider ``kill -9`` + restarts (down 0.3 s) and as
   many bridge ``kill -9`` + restarts, interleaved; X.509 TTL 30 s, so every outage is far
   shorter than TTL/2. Target: 0 failed requests.
2. ``outage``: ``--outages`` (3) outages longer than the TTL (3 s TTL, 4 s down): the
   seconds from the provider's socket reappearing to Envoy presenting the new SVID.
   Failed requests during the outage are expected (the SVID expired) and not counted.
3. ``stall``: ``--stalls`` (3) times, the bridge's upstream connection is frozen (kept
   open, nothing forwarded; :class:`tests.harness.chaos.StallProxy`) while new connections to the
   same path work; X.509 TTL 6 s. Measured: seconds from the freeze to Envoy presenting a
   fresh SVID, and failed requests (target 0: the stall is abandoned before expiry).

Baseline (same run): requests served with no fault injected over the same traffic loop
(the failure rate of the harness itself, expected 0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from _common import machine, machine_line, run_benchmark, summary, table, verdict, workspace

from tests.harness.chaos import (
    StallProxy,
    Traffic,
    kill_bridge,
    outage_recovery,
    restart_provider,
    start_envoy,
)
from tests.harness.envoy import Envoys
from tests.harness.procs import Processes, wait_for
from tests.harness.stack import Stack
from tests.harness.tlsclient import HttpsClient


class Rig:
    """Provider, bridge, Envoy and traffic in ``workdir``; closed by :meth:`close`."""

    def __init__(self, workdir: Path, ttl: str, *, proxy: bool = False) -> None:
        workdir.mkdir()
        self.procs = Processes(workdir)
        self.envoys = Envoys(workdir)
        self.stack = Stack(self.procs, workdir, x509_ttl=ttl)
        self.proxy: StallProxy | None = None
        if proxy:
            self.proxy = StallProxy(workdir / "proxy.sock", self.stack.workload_socket)
            self.stack.write_config(workload_api=f"unix://{self.proxy.listen}")
        self.stack.start_provider()
        if self.proxy is not None:
            self.proxy.start()
        self.stack.start_bridge()
        _, port = start_envoy(self.envoys, self.stack)
        client = self.stack.material("client-a")
        self.traffic = Traffic(HttpsClient(client.ca, client.cert, client.key), port).start()
        wait_for(lambda: self.traffic.ok >= 5, 20, "traffic")

    def flowing(self) -> None:
        before = self.traffic.ok
        wait_for(lambda: self.traffic.ok > before + 3, 30, "traffic flowing")

    def close(self) -> None:
        self.traffic.stop()
        if self.proxy is not None:
            self.proxy.close()
        self.envoys.close()
        self.procs.close()


def baseline(workdir: Path, seconds: float) -> dict[str, Any]:
    rig = Rig(workdir / "baseline", "30s")
    try:
        start_ok, start_failed = rig.traffic.ok, len(rig.traffic.failures)
        time.sleep(seconds)
        return {
            "seconds": seconds,
            "requests": rig.traffic.ok - start_ok,
            "failed": len(rig.traffic.failures) - start_failed,
        }
    finally:
        rig.close()


def restarts(workdir: Path, count: int) -> dict[str, Any]:
    rig = Rig(workdir / "restarts", "30s")
    to_bridge: list[float] = []
    started = time.monotonic()
    try:
        start_ok = rig.traffic.ok
        for i in range(count):
            to_bridge.append(restart_provider(rig.stack, rig.procs))
            rig.flowing()
            kill_bridge(rig.stack, rig.procs)
            rig.flowing()
            print(f"restart {i + 1}/{count}: failed so far {len(rig.traffic.failures)}", flush=True)
        wait_for(lambda: rig.traffic.serial() == rig.stack.served_serial(), 20, "in sync")
        return {
            "provider_restarts": count,
            "bridge_kills": count,
            "seconds": time.monotonic() - started,
            "requests": rig.traffic.ok - start_ok,
            "failed": len(rig.traffic.failures),
            "failures": [f for _, f in rig.traffic.failures[:20]],
            "provider_back_to_bridge_ms": summary([t * 1000 for t in to_bridge]),
        }
    finally:
        rig.close()


def outages(workdir: Path, count: int) -> dict[str, Any]:
    rig = Rig(workdir / "outage", "3s")
    runs = []
    try:
        for i in range(count):
            runs.append(outage_recovery(rig.stack, rig.procs, rig.traffic, 4.0))
            print(f"outage {i + 1}/{count}: {runs[-1]}", flush=True)
        return {
            "outages": count,
            "outage_s": summary([r["outage"] for r in runs]),
            "to_bridge_ms": summary([r["to_bridge"] * 1000 for r in runs]),
            "to_envoy_ms": summary([r["to_envoy"] * 1000 for r in runs]),
        }
    finally:
        rig.close()


def stalls(workdir: Path, count: int) -> dict[str, Any]:
    rig = Rig(workdir / "stall", "6s", proxy=True)
    assert rig.proxy is not None
    recovered: list[float] = []
    try:
        for i in range(count):
            log_before = rig.procs.log(rig.stack.bridge).count("workload_api.silent")
            frozen_serial = rig.stack.served_serial()
            frozen = rig.proxy.freeze()
            at = time.monotonic()
            wait_for(
                lambda n=log_before: (
                    rig.procs.log(rig.stack.bridge).count("workload_api.silent") > n
                ),
                20,
                "the stall noticed",
            )
            wait_for(lambda s=frozen_serial: rig.stack.served_serial() != s, 20, "fresh SVID")
            seen = wait_for(
                lambda s=frozen_serial, t=at: next(
                    (when for when, serial in rig.traffic.served if when >= t and serial != s),
                    None,
                ),
                20,
                "Envoy presents it",
            )
            recovered.append(seen - at)
            print(
                f"stall {i + 1}/{count}: froze {frozen} connection(s), Envoy fresh after "
                f"{seen - at:.2f} s",
                flush=True,
            )
        log = rig.procs.log(rig.stack.bridge)
        return {
            "stalls": count,
            "freeze_to_envoy_s": summary(recovered),
            "failed": len(rig.traffic.failures),
            "svid_expired_lines": log.count("svid.expired"),
        }
    finally:
        rig.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    print(machine_line(info))
    with workspace("sdsb-chaos-") as workdir:
        base = baseline(workdir, 10.0)
        rs = restarts(workdir, args.restarts)
        out = outages(workdir, args.outages)
        st = stalls(workdir, args.stalls)
    print("\nChaos under fresh-connection mTLS traffic through Envoy")
    rows = [
        ["baseline: no fault, 10 s", base["requests"], base["failed"], ""],
        [
            f"{rs['provider_restarts']} provider kill -9 + {rs['bridge_kills']} bridge kill -9",
            rs["requests"],
            rs["failed"],
            f"provider back -> bridge p50 {rs['provider_back_to_bridge_ms']['p50']:.0f} ms",
        ],
        [
            f"{st['stalls']} stalled upstreams (TTL 6 s)",
            "",
            st["failed"],
            f"freeze -> Envoy fresh p50 {st['freeze_to_envoy_s']['p50']:.2f} s, "
            f"max {st['freeze_to_envoy_s']['max']:.2f} s",
        ],
        [
            f"{out['outages']} outages of {out['outage_s']['p50']:.1f} s (> TTL 3 s)",
            "",
            "(expected)",
            f"back -> Envoy p50 {out['to_envoy_ms']['p50']:.0f} ms, "
            f"max {out['to_envoy_ms']['max']:.0f} ms",
        ],
    ]
    print(table(["phase", "requests", "failed", "timing"], rows))
    targets = [
        ["0 failed requests, restarts + kill -9", rs["failed"], verdict(rs["failed"] == 0)],
        ["0 failed requests, stalls", st["failed"], verdict(st["failed"] == 0)],
        [
            "Envoy <= 1 s after an outage > TTL",
            f"max {out['to_envoy_ms']['max']:.0f} ms",
            verdict(out["to_envoy_ms"]["max"] <= 1000),
        ],
    ]
    print(table(["target", "measured", "verdict"], targets))
    return {
        "benchmark": "chaos",
        "machine": info,
        "args": vars(args),
        "baseline": base,
        "restarts": rs,
        "outages": out,
        "stalls": st,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 restarts, 1 outage, 1 stall")
    parser.add_argument("--restarts", type=int, default=None, help="provider and bridge kills")
    parser.add_argument("--outages", type=int, default=None)
    parser.add_argument("--stalls", type=int, default=None)
    args = parser.parse_args()
    quick = args.quick
    args.restarts = args.restarts or (3 if quick else 20)
    args.outages = args.outages or (1 if quick else 3)
    args.stalls = args.stalls or (1 if quick else 3)
    return run_benchmark("chaos", run, args)


if __name__ == "__main__":
    sys.exit(main())
