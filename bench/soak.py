"""Soak: ``sds run`` under continuous mTLS traffic through a real Envoy, with 1-minute SVIDs.

Usage: ``.venv/bin/python bench/soak.py [--minutes 60] [--ttl 1m] [--interval 0.02]``

The whole chain is real: the embedded provider (``sds workload-api``,
ephemeral CA) issues the server SVID ``web`` with a TTL of ``--ttl`` (it
re-issues at half-life: ~120 rotations an hour at 1 minute) -> ``sds run``
-> one Envoy (mTLS listener, ``default`` + ``ROOTCA`` over SDS, direct
response). This process is the client: a new TCP + TLS connection per
request (its own SVID ``client-a`` from the provider, refetched every 15
minutes), verifying Envoy's chain against the bundle, ``GET /`` and checking
the 200 and the body; one request every ``--interval`` seconds after the
previous one ends. Every 10 s it samples the bridge's VmRSS and open file
descriptors (``/proc/<pid>/fd``) and Envoy's RSS.

Verdicts: 0 failed requests; bridge RSS at the end <= 105% of its median
over the first sample window after warm-up (the first sixth of the run, at
least 1 minute); descriptors flat (max - min after warm-up <= 2); no bridge
log line above INFO except those in ``EXPECTED_WARNINGS``; the number of
distinct server serials the client saw (rotations observed through Envoy).
The issue's acceptance run is 60 minutes; it is a script, never part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    Procs,
    machine,
    machine_line,
    rss_kb,
    run_benchmark,
    sds_argv,
    summary,
    table,
    verdict,
    wait_until,
    workspace,
)
from cryptography import x509

from sds.spiffe.x509 import X509Context
from sds.workloadapi.client import WorkloadApiClient
from tests.harness.envoy import Envoys, bootstrap, downstream_mtls_listener, sds_cluster
from tests.harness.stack import identities_yaml

TARGET_RSS_GROWTH = 0.05
FD_SLACK = 2
SAMPLE_SECONDS = 10.0
CLIENT_REFRESH_SECONDS = 15 * 60
# Bridge log events above INFO that a healthy soak may show (none known so far).
EXPECTED_WARNINGS: frozenset[str] = frozenset()
_LOG_LINE = re.compile(r"^\S+Z (\w+) (\S+) (\S+)")


def fetch_client(workload_sock: Path) -> tuple[bytes, bytes, bytes]:
    """(chain PEM, key PEM, bundle PEM) of the ``client-a`` SVID."""

    async def fetch() -> X509Context:
        async with WorkloadApiClient(f"unix://{workload_sock}") as client:
            return await client.fetch_x509_context()

    ctx = asyncio.run(fetch())
    svid = ctx.find(hint="client-a")
    if svid is None:
        raise RuntimeError("the provider issued no client-a SVID")
    bundle = ctx.bundles[svid.spiffe_id.trust_domain]
    return svid.chain_pem(), svid.key_pem(), bundle.pem()


class Client:
    """mTLS client: one new connection per request."""

    def __init__(self, workload_sock: Path, wd: Path) -> None:
        self.workload_sock = workload_sock
        self.wd = wd
        self.context = self._context()
        self.fetched = time.monotonic()

    def _context(self) -> ssl.SSLContext:
        chain, key, ca = fetch_client(self.workload_sock)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # SPIFFE SVIDs carry a URI SAN, no DNS name
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=ca.decode())
        # load_cert_chain reads files only: a private 0600 file, removed at once.
        fd, path = tempfile.mkstemp(dir=self.wd, suffix=".pem")
        try:
            os.write(fd, chain + key)
            os.close(fd)
            context.load_cert_chain(path)
        finally:
            os.unlink(path)
        return context

    def request(self, port: int) -> int:
        """One GET / over a fresh connection; the server leaf's serial. Raises on any failure."""
        if time.monotonic() - self.fetched > CLIENT_REFRESH_SECONDS:
            self.context = self._context()
            self.fetched = time.monotonic()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            self.context.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            tls.sendall(b"GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
        status = data.split(b"\r\n", 1)[0]
        if not status.startswith(b"HTTP/1.1 200") or not data.endswith(b"hello from app"):
            raise RuntimeError(f"unexpected response: {status!r}")
        return x509.load_der_x509_certificate(der).serial_number


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def log_above_info(text: str) -> dict[str, int]:
    """Bridge log events at WARNING or above: event -> count."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        match = _LOG_LINE.match(line)
        if match and match.group(1) in ("WARNING", "ERROR", "CRITICAL"):
            out[match.group(3)] = out.get(match.group(3), 0) + 1
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    print(machine_line(info), flush=True)
    with workspace("sdsk-") as wd, Procs(wd) as procs, Envoys(wd / "envoy") as envoys:
        return _run(args, info, wd, procs, envoys)


def _run(
    args: argparse.Namespace, info: dict[str, Any], wd: Path, procs: Procs, envoys: Envoys
) -> dict[str, Any]:
    identities = wd / "identities.yaml"
    identities.write_text(identities_yaml(("web", "client-a")))
    workload_sock = wd / "workload.sock"
    provider = procs.start(
        sds_argv(
            "workload-api",
            "--socket",
            str(workload_sock),
            "--trust-domain",
            "example.org",
            "--identities",
            str(identities),
            "--ephemeral",
            "--x509-ttl",
            args.ttl,
        ),
        "provider",
    )
    wait_until(workload_sock.exists, 30, "provider socket", provider)
    sock = wd / "sds" / "sds.sock"
    bridge = procs.start(
        sds_argv(
            "--log-level",
            "INFO",
            "run",
            "--workload-api",
            f"unix://{workload_sock}",
            "--listen",
            f"unix://{sock}",
            "--admin",
            "127.0.0.1:0",
        ),
        "bridge",
    )
    wait_until(sock.exists, 30, "bridge socket", bridge)
    envoy = envoys.start(
        bootstrap("soak", "bench", [downstream_mtls_listener("in")], [sds_cluster("sds", sock)]),
        log_level="warning",
        name="envoy",
    )
    port = envoy.listener_port("in")
    client = Client(workload_sock, wd)
    wait_until(lambda: _ok(client, port), 30, "a first request through Envoy")

    duration = args.minutes * 60
    warmup = max(60.0, duration / 6)
    start = time.monotonic()
    samples: list[dict[str, float]] = []
    requests = 0
    failures: list[str] = []
    latencies: list[float] = []
    serials: list[int] = []
    next_sample = start
    print(f"soak: {args.minutes:g} min, SVID TTL {args.ttl}, warm-up {warmup:.0f} s", flush=True)
    while (now := time.monotonic()) - start < duration:
        if now >= next_sample:
            samples.append(
                {
                    "t": now - start,
                    "bridge_rss_kb": rss_kb(bridge.pid),
                    "bridge_fds": fd_count(bridge.pid),
                    "envoy_rss_kb": rss_kb(envoy.pid),
                    "requests": requests,
                    "failures": len(failures),
                }
            )
            last = samples[-1]
            print(
                f"  {last['t']:6.0f} s: {requests} requests, {len(failures)} failed, "
                f"{len(set(serials))} serials seen; bridge {last['bridge_rss_kb'] / 1024:.1f} MB, "
                f"{last['bridge_fds']} fds",
                flush=True,
            )
            next_sample += SAMPLE_SECONDS
        t0 = time.monotonic()
        try:
            serial = client.request(port)
            latencies.append((time.monotonic() - t0) * 1000)
            if not serials or serials[-1] != serial:
                serials.append(serial)
        except Exception as exc:
            failures.append(f"{time.monotonic() - start:.1f} s: {exc!r}")
        requests += 1
        time.sleep(args.interval)
    return report(
        args,
        info,
        samples=samples,
        requests=requests,
        failures=failures,
        latencies=latencies,
        serials=serials,
        warmup=warmup,
        procs=procs,
        bridge=bridge,
    )


def _ok(client: Client, port: int) -> bool:
    try:
        client.request(port)
    except Exception:
        return False
    return True


def report(
    args: argparse.Namespace,
    info: dict[str, Any],
    *,
    samples: list[dict[str, float]],
    requests: int,
    failures: list[str],
    latencies: list[float],
    serials: list[int],
    warmup: float,
    procs: Procs,
    bridge: Any,
) -> dict[str, Any]:
    after = [s for s in samples if s["t"] >= warmup] or samples[-1:]
    base_window = after[: max(1, len(after) // 6)]
    base_rss = summary([s["bridge_rss_kb"] for s in base_window])["p50"]
    end_rss = after[-1]["bridge_rss_kb"]
    growth = end_rss / base_rss - 1
    fds = [int(s["bridge_fds"]) for s in after]
    warnings = log_above_info(procs.log(bridge))
    unexpected = {k: v for k, v in warnings.items() if k not in EXPECTED_WARNINGS}
    lat = summary(latencies)
    print(f"\nRequests: {requests}, failed {len(failures)}; latency ms p50 {lat['p50']:.1f}")
    for line in failures[:10]:
        print(f"  failed at {line}")
    print(f"Server serials seen by the client: {len(set(serials))} (changes: {len(serials) - 1})")
    print(f"Bridge log events above INFO: {warnings or 'none'}")
    targets = [
        ["0 failed requests", f"{len(failures)} of {requests}", verdict(not failures)],
        [
            f"bridge RSS growth after warm-up <= {TARGET_RSS_GROWTH:.0%}",
            f"{base_rss / 1024:.1f} -> {end_rss / 1024:.1f} MB ({growth:+.1%})",
            verdict(growth <= TARGET_RSS_GROWTH),
        ],
        [
            "bridge fds flat after warm-up",
            f"{min(fds)}..{max(fds)}",
            verdict(max(fds) - min(fds) <= FD_SLACK),
        ],
        [
            "no bridge log line above INFO except expected ones",
            ", ".join(f"{k} x{v}" for k, v in unexpected.items()) or "none",
            verdict(not unexpected),
        ],
        [
            "rotations seen through Envoy",
            f"{len(serials) - 1} in {args.minutes:g} min",
            verdict(len(serials) > 1),
        ],
    ]
    print("\nTargets")
    print(table(["target", "measured", "verdict"], targets))
    return {
        "benchmark": "soak",
        "machine": info,
        "args": vars(args),
        "requests": requests,
        "failures": failures,
        "latency_ms": lat,
        "serial_changes": len(serials) - 1,
        "samples": samples,
        "log_above_info": warnings,
        "targets": {row[0]: [row[1], row[2]] for row in targets},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="soak length (default 60)")
    parser.add_argument("--ttl", default="1m", help="server SVID TTL (default 1m)")
    parser.add_argument(
        "--interval", type=float, default=0.02, help="pause between requests, s (default 0.02)"
    )
    args = parser.parse_args()
    return run_benchmark("soak", run, args)


if __name__ == "__main__":
    sys.exit(main())
