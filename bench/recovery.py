"""Recovery after a Workload API outage longer than the SVID lifetime: seconds from the
provider's socket reappearing to a real Envoy presenting the new SVID.

Setup: ``sds workload-api`` (X.509 TTL 3 s), ``sds run``, one Envoy terminating mTLS
with ``default``/``ROOTCA``, and a client making a new TLS connection every 20 ms. Each
cycle kills the provider (``kill -9``), waits until the bridge has withdrawn the expired
SVID and the outage exceeds ``--outage`` seconds, starts the provider again and times:

* ``to_bridge``: socket back -> the bridge serves the new SVID (``/secrets``);
* ``to_envoy``: socket back -> the first request whose handshake presents it.

Baseline, same run: ``direct``: socket back -> a fresh Workload API client (in this
process, retrying every 1 ms) holds its first X.509-SVID: the floor for any bridge.
Target: ``to_envoy`` <= 1 s, every cycle.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

from _common import machine, machine_line, run_benchmark, summary, table, verdict, workspace

from sds._workloadapi import WorkloadApiClient
from sds.errors import SdsError
from tests.chaos import Traffic, outage_recovery, start_envoy, start_provider_timed
from tests.conftest import Processes, wait_for
from tests.envoy import Envoys
from tests.stack import Stack
from tests.tlsclient import HttpsClient

TARGET_S = 1.0


def direct_cycle(stack: Stack, procs: Processes) -> float:
    """Kill and restart the provider; seconds until a fresh client gets an SVID."""
    procs.stop(stack.provider, signal.SIGKILL)
    time.sleep(0.5)

    async def first_svid() -> float:
        while True:
            try:
                async with WorkloadApiClient(f"unix://{stack.workload_socket}") as client:
                    await client.fetch_x509_context()
                return time.monotonic()
            except SdsError:
                await asyncio.sleep(0.001)

    back = start_provider_timed(stack)
    return asyncio.run(first_svid()) - back


def measure(workdir: Path, cycles: int, outage: float) -> dict[str, Any]:
    procs = Processes(workdir)
    envoys = Envoys(workdir)
    try:
        stack = Stack(procs, workdir, x509_ttl="3s")
        stack.start_provider()
        stack.start_bridge()
        _, port = start_envoy(envoys, stack)
        client = stack.material("client-a")
        traffic = Traffic(HttpsClient(client.ca, client.cert, client.key), port).start()
        wait_for(lambda: traffic.ok >= 5, 20, "traffic")
        runs = []
        try:
            for i in range(cycles):
                figures = outage_recovery(stack, procs, traffic, outage)
                runs.append(figures)
                print(
                    f"cycle {i + 1}: outage {figures['outage']:.2f} s, "
                    f"bridge {figures['to_bridge'] * 1000:.0f} ms, "
                    f"Envoy {figures['to_envoy'] * 1000:.0f} ms",
                    flush=True,
                )
                wait_for(lambda: traffic.ok > 0 and traffic.serial() is not None, 10, "traffic")
        finally:
            traffic.stop()
        direct = [direct_cycle(stack, procs) for _ in range(cycles)]
        return {"runs": runs, "direct": direct}
    finally:
        envoys.close()
        procs.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    print(machine_line(info))
    with workspace("sdsb-rec-") as workdir:
        data = measure(workdir, args.cycles, args.outage)
    to_envoy = [r["to_envoy"] * 1000 for r in data["runs"]]
    to_bridge = [r["to_bridge"] * 1000 for r in data["runs"]]
    direct = [d * 1000 for d in data["direct"]]
    rows = [
        ["socket back -> bridge serves new SVID", *_cells(summary(to_bridge))],
        ["socket back -> Envoy presents it", *_cells(summary(to_envoy))],
        ["baseline: socket back -> direct client has an SVID", *_cells(summary(direct))],
    ]
    print(f"\nRecovery after an outage > TTL (3 s), {args.cycles} cycles (ms)")
    print(table(["what", "p50", "max"], rows))
    worst = max(to_envoy) / 1000
    print(
        table(
            ["target", "measured", "verdict"],
            [
                [
                    "Envoy <= 1 s after the provider is back, every cycle",
                    f"max {worst:.3f} s",
                    verdict(worst <= TARGET_S),
                ],
            ],
        )
    )
    return {
        "benchmark": "recovery",
        "machine": info,
        "args": vars(args),
        "to_bridge_ms": summary(to_bridge),
        "to_envoy_ms": summary(to_envoy),
        "direct_ms": summary(direct),
        "raw": data,
    }


def _cells(s: dict[str, float]) -> list[str]:
    return [f"{s['p50']:.0f}", f"{s['max']:.0f}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 cycles")
    parser.add_argument("--cycles", type=int, default=None, help="outage cycles (default 10)")
    parser.add_argument("--outage", type=float, default=4.0, help="seconds down (> the 3 s TTL)")
    args = parser.parse_args()
    if args.cycles is None:
        args.cycles = 3 if args.quick else 10
    return run_benchmark("recovery", run, args)


if __name__ == "__main__":
    sys.exit(main())
