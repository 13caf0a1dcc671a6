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

``--upstream spire``: the same measurement against a real SPIRE agent v1.13.3
(``tests/harness/spire.py``; ``default_x509_svid_ttl`` ``--spire-ttl``, default 20 s, so a leaf
expires at most 20 s after the agent stops). Two identical Envoys terminate mTLS with
``default``/``ROOTCA``: *spire* on the agent's own SDS (its Workload API socket), *bridge*
on ``sds run`` fed by the same agent (same entry). Each cycle stops the agent (SIGTERM and
SIGKILL alternately), waits ``--outage`` s (> the TTL: every leaf has expired), starts it
again with the same data dir (it re-attests from its stored key) and times, from the
socket reappearing (its ctime), until a fresh handshake to each Envoy presents a new, unexpired leaf
(fresh Python ssl handshakes alternate between the two Envoys). ``direct``: socket back ->
a fresh Workload API client (retrying every 10 ms, in a thread) holds an unexpired SVID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _common import (
    PYTHON,
    Prober,
    machine,
    machine_line,
    ratio,
    run_benchmark,
    summary,
    table,
    verdict,
    wait_until,
    workspace,
)
from cryptography import x509

from sds.errors import SdsError
from sds.workloadapi.client import WorkloadApiClient
from tests.harness.chaos import Traffic, outage_recovery, start_envoy, start_provider_timed
from tests.harness.envoy import Envoys, bootstrap, downstream_mtls_listener, sds_cluster
from tests.harness.procs import Processes, wait_for
from tests.harness.spire import (
    SPIRE_VERSION,
    TRUST_DOMAIN,
    SpireAgent,
    SpireServer,
    fetch_context,
    own_uid_selector,
    spire_binaries,
)
from tests.harness.stack import Stack
from tests.harness.tlsclient import HttpsClient

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


WEB = f"spiffe://{TRUST_DOMAIN}/web"


def _fresh_leaf(der: bytes | None, old: set[bytes]) -> bool:
    """``der`` is a leaf not presented before the outage and not expired now."""
    if der is None or der in old:
        return False
    cert = x509.load_der_x509_certificate(der)
    return cert.not_valid_after_utc > dt.datetime.now(dt.UTC)


def _direct_fresh(socket: Path, back: float, out: dict[str, float]) -> None:
    """Thread body: from ``back``, fetch from the agent every 10 ms until an unexpired SVID."""
    while time.monotonic() - back < 60:
        with contextlib.suppress(Exception):
            ctx = fetch_context(socket, timeout=2.0)
            svid = ctx.find(spiffe_id=WEB)
            if svid is not None and svid.chain[0].not_valid_after_utc > dt.datetime.now(dt.UTC):
                out["direct"] = time.monotonic() - back
                return
        time.sleep(0.01)


def _restart_agent(agent: SpireAgent) -> float:
    """Start the stopped agent again (same data dir, no join token); the monotonic time its
    socket was made: from the file's ctime (bind), not when the 1 ms poll saw it (a loaded
    machine may wake the poll late), as in ``tests/harness/chaos.py``."""
    with contextlib.suppress(FileNotFoundError):
        agent.socket.unlink()
    argv = [str(agent.binary), "run", "-config", str(agent.config)]
    agent.proc = agent.server.procs.start(argv, agent.name)
    deadline = time.monotonic() + 60
    while not agent.socket.exists():
        if agent.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"spire-agent did not come back:\n{agent.log()[-3000:]}")
        time.sleep(0.001)
    age = max(0.0, time.time() - agent.socket.stat().st_ctime_ns / 1e9)
    return time.monotonic() - age


def spire_cycle(
    agent: SpireAgent, ports: dict[str, int], prober: Prober, outage: float, sig: int
) -> dict[str, float]:
    """One outage: stop the agent with ``sig`` for ``outage`` s, start it, time both Envoys."""
    old: set[bytes] = set()
    for port in ports.values():
        der = prober.leaf_der(port)
        if der is not None:
            old.add(der)
    down = time.monotonic()
    agent.stop(sig)
    # Keep probing while down: every leaf presented before the agent is back is "old".
    while time.monotonic() - down < outage:
        for port in ports.values():
            der = prober.leaf_der(port)
            if der is not None:
                old.add(der)
        time.sleep(0.2)
    # The prober verifies the server chain: an expired leaf fails the handshake (None).
    none_valid = all(prober.leaf_der(p) is None for p in ports.values())
    back = _restart_agent(agent)
    direct: dict[str, float] = {}
    thread = threading.Thread(target=_direct_fresh, args=(agent.socket, back, direct), daemon=True)
    thread.start()
    seen: dict[str, float] = {}
    pending = dict(ports)
    while pending:
        for name, port in list(pending.items()):
            if _fresh_leaf(prober.leaf_der(port, timeout=1.0), old):
                seen[name] = time.monotonic() - back
                del pending[name]
        if time.monotonic() - back > 90:
            raise RuntimeError(f"{list(pending)} presented no new SVID within 90 s")
    thread.join(60)
    return {
        "outage": back - down,
        "signal": float(sig),
        "no_valid_leaf_at_restart": float(none_valid),
        **{f"to_{name}": value for name, value in seen.items()},
        "direct": direct.get("direct", float("nan")),
    }


def measure_spire(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    server_bin, agent_bin = spire_binaries()
    procs = Processes(workdir)
    envoys = Envoys(workdir / "envoy")
    agent: SpireAgent | None = None
    spire_server: SpireServer | None = None
    try:
        spire_server = SpireServer(procs, server_bin, x509_ttl=f"{args.spire_ttl}s").start()
        agent = SpireAgent(spire_server, agent_bin).start()
        spire_server.entry_create(agent.spiffe_id, WEB, own_uid_selector(), hint="web")
        agent.wait_svid(WEB)
        client = spire_server.mint(f"spiffe://{TRUST_DOMAIN}/client")
        sds_socket = workdir / "sds" / "sds.sock"
        bridge = procs.start(
            [
                PYTHON,
                "-m",
                "sds",
                "--log-level",
                "DEBUG",
                "run",
                "--workload-api",
                f"unix://{agent.socket}",
                "--listen",
                f"unix://{sds_socket}",
            ],
            "bridge",
        )
        wait_until(sds_socket.exists, 60, "bridge SDS socket", bridge)
        ports = {}
        for name, socket_path in (("spire", agent.socket), ("bridge", sds_socket)):
            config = bootstrap(
                f"rec-{name}",
                "bench",
                [downstream_mtls_listener("in")],
                [sds_cluster("sds", socket_path)],
            )
            envoy = envoys.start(config, log_level="warning", name=f"envoy-{name}")
            ports[name] = envoy.listener_port("in")
        prober = Prober(client.ca, client.cert, client.key, workdir)
        wait_until(
            lambda: all(prober.leaf_der(p) is not None for p in ports.values()),
            60,
            "both Envoys serving",
        )
        runs = []
        for i in range(args.cycles):
            sig = signal.SIGTERM if i % 2 == 0 else signal.SIGKILL
            figures = spire_cycle(agent, ports, prober, args.outage, sig)
            runs.append(figures)
            print(
                f"cycle {i + 1} ({signal.Signals(sig).name}): outage {figures['outage']:.1f} s, "
                f"bridge's Envoy {figures['to_bridge'] * 1000:.0f} ms, "
                f"SPIRE SDS's Envoy {figures['to_spire'] * 1000:.0f} ms, "
                f"direct client {figures['direct'] * 1000:.0f} ms",
                flush=True,
            )
        log = procs.log(bridge).splitlines()
        keep = ("workload_api.", "svid.", "ready")
        lines = [x for x in log if any(k in x for k in keep) and "not_serving_yet" not in x]
        retries = sum("not_serving_yet" in x for x in log)
        return {"runs": runs, "bridge_log": lines[-200:], "bridge_not_serving_yet_lines": retries}
    except BaseException:
        for _, log in procs._procs:
            sys.stderr.write(f"\n--- {log.name}\n{log.read_text(errors='replace')[-2500:]}")
        raise
    finally:
        envoys.close()
        procs.close()
        for owned in (agent, spire_server):
            if owned is not None:
                owned.close()


def run_spire(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    print(machine_line(info), flush=True)
    if args.outage <= args.spire_ttl:
        raise SystemExit(f"--outage {args.outage} must exceed --spire-ttl {args.spire_ttl}")
    with workspace("sdsb-recs-") as workdir:
        data = measure_spire(workdir, args)
    bridge = [r["to_bridge"] * 1000 for r in data["runs"]]
    spire = [r["to_spire"] * 1000 for r in data["runs"]]
    direct = [r["direct"] * 1000 for r in data["runs"]]
    b, s, d = summary(bridge), summary(spire), summary(direct)
    rows = [
        ["bridge: socket back -> its Envoy presents a new SVID", *_cells(b)],
        [f"SPIRE {SPIRE_VERSION} SDS: socket back -> its Envoy presents one", *_cells(s)],
        ["floor: socket back -> a direct client holds one", *_cells(d)],
    ]
    print(
        f"\nRecovery after a SPIRE agent outage > TTL ({args.spire_ttl:g} s), "
        f"{args.cycles} cycles (ms)"
    )
    print(table(["what", "p50", "max"], rows))
    print(
        table(
            ["target", "measured", "verdict"],
            [
                [
                    "bridge's Envoy <= 1 s after the agent is back, every cycle",
                    f"max {b['max'] / 1000:.3f} s",
                    verdict(b["max"] / 1000 <= TARGET_S),
                ],
                [
                    "bridge vs SPIRE's own SDS (p50 ratio)",
                    f"{ratio(b['p50'], s['p50']):.3f}x",
                    verdict(b["p50"] <= s["p50"]),
                ],
            ],
        )
    )
    return {
        "benchmark": "recovery-spire",
        "spire_version": SPIRE_VERSION,
        "machine": info,
        "args": vars(args),
        "to_bridge_envoy_ms": b,
        "to_spire_envoy_ms": s,
        "direct_ms": d,
        "ratio_p50_bridge_over_spire": ratio(b["p50"], s["p50"]),
        "ratio_max_bridge_over_spire": ratio(b["max"], s["max"]),
        "raw": data,
    }


def _cells(s: dict[str, float]) -> list[str]:
    return [f"{s['p50']:.0f}", f"{s['max']:.0f}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 cycles")
    parser.add_argument("--cycles", type=int, default=None, help="outage cycles (default 10)")
    parser.add_argument("--outage", type=float, default=None, help="seconds down (> the TTL)")
    parser.add_argument(
        "--upstream",
        choices=["provider", "spire"],
        default="provider",
        help="the embedded provider (default) or a real SPIRE agent",
    )
    parser.add_argument(
        "--spire-ttl", type=float, default=20.0, help="SPIRE default_x509_svid_ttl, seconds"
    )
    args = parser.parse_args()
    if args.upstream == "spire":
        if args.cycles is None:
            args.cycles = 4
        if args.outage is None:
            args.outage = args.spire_ttl + 2.0
        return run_benchmark("recovery-spire", run_spire, args)
    if args.cycles is None:
        args.cycles = 3 if args.quick else 10
    if args.outage is None:
        args.outage = 4.0
    return run_benchmark("recovery", run, args)


if __name__ == "__main__":
    sys.exit(main())
