"""Per-caller mode's cost: 100 workloads x 3 SDS streams on one bridge fed by the embedded provider.

Usage: ``.venv/bin/python bench/per_caller.py [--quick] [--workloads N] [--runs R]
[--rotations K] [--warmup W]``

Two cases per run, each on a fresh ``sds run`` fed by one ``sds workload-api``
(the embedded provider, started once for the whole benchmark):

* **shared** (the baseline): a default-mode bridge (``--workload-api``), whose
  own SVID every stream gets: N x 3 streams on one Workload API subscription;
* **per-caller**: ``per_caller: {delegated_identity_api: <admin socket>}``:
  every stream is attested by its caller's pidfd and each caller process gets
  its own Delegated Identity subscription (by pid), Bridge and cache.

**Cheap callers.** Attestation is by the pid that called ``connect()``, so each
workload must be its own process, but N Python SDS clients would cost GBs.
Before anything else starts, this process forks N tiny children (no imports,
no event loop: a blocking ``os.read`` on a pipe). On a command a child
connects 3 Unix sockets to the SDS socket it is given and passes the 3 fds
back over a socketpair (SCM_RIGHTS), then waits for the next command; it
exits on the pipe's EOF, and ``PR_SET_PDEATHSIG`` kills it if this process
dies. This process runs all N x 3 gRPC streams on the adopted sockets
(grpclib ``Channel`` with its connection made by
``loop.create_unix_connection(sock=...)``); the kernel recorded the child as
each socket's peer at ``connect()``, so the bridge attests each child as one
workload. The same children serve both cases.

**Distinct identities.** Every child runs as root, so uid/gid rules would
give them all one SPIFFE ID; instead each child k gets its own identity
``spiffe://example.org/w/<k>`` by a ``workload.unix.pid`` rule (the children
are forked before the identities file is written). The bridges get
``spiffe://example.org/bridge`` (uid 0 and not a child's pid), the authorized
delegate. Once the streams are open the benchmark checks that every stream of
child k holds an SVID for ``/w/<k>`` (per-caller) or ``/bridge`` (shared), and
that a workload's 3 streams hold the same serial.

**Streams.** Per workload: ``default``; its own SPIFFE ID by name; ``default``
+ ``ROOTCA`` on one stream. Each carries the workload's leaf, so each shows
a rotation. Every response is ACKed like Envoy.

**Memory.** VmRSS of the bridge with no caller (after start, idle), then with
all N x 3 streams answered and the bridge idle: (RSS_all - RSS_0) / N per
workload, for both cases; the ratio per-caller / shared is the overhead.

**Rotation.** A rotation is triggered for every workload at once: this
process rewrites the identities file with every identity's X.509 lifetime
toggled (1h <-> 3599s) and sends the provider SIGHUP; the provider re-issues
each stream's SVID (a lifetime change re-mints, docs/identities.md "Reload")
and pushes it. T0 per workload is independent of the trigger: the provider
logs ``svid.issued ... serial=<hex> pid=<pid>`` with a millisecond UTC
timestamp as it mints each SVID, just before sending it; the benchmark
matches the serial its streams end up holding to that line. Per workload:
T0 -> the last of its 3 streams holding the new leaf (``time.time()``, the
same wall clock). Reported: p50 / p90 / max over workloads, and the last
stream of all after the first SVID minted and after SIGHUP. In the
per-caller case the provider mints N SVIDs one after another (one per
subscription), so "after SIGHUP" includes the provider's own minting; the
per-workload figure does not. The shared case mints one SVID, pushed to all
N x 3 streams. Each rotation waits for the bridge to go idle first.

Prints the tables, writes ``bench/results/per_caller-<UTC>.json`` (and
``-latest``); a full run (not ``--quick``) also rewrites
``docs/bench/per_caller.json`` (the results BENCHMARKS.md cites, committed)
and ``docs/bench/per_caller.png``; ``--no-summary`` leaves both alone,
``--plot-only`` redraws the PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as dt
import json
import os
import re
import resource
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common  # (first: puts the repository on sys.path)
from _common import (
    CLK_TCK,
    SDS_SERVICE,
    Procs,
    RawCodec,
    cpu_ticks,
    discovery_request,
    machine,
    machine_line,
    ratio,
    rss_kb,
    run_benchmark,
    sds_argv,
    summary,
    table,
    wait_idle,
    wait_until,
    workspace,
)
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.protocol import H2Protocol

TD = "example.org"
SUMMARY = _common.REPO / "docs" / "bench" / "per_caller.json"
PLOT = _common.REPO / "docs" / "bench" / "per_caller.png"
BRIDGE_ID = f"spiffe://{TD}/bridge"
STREAMS_PER_WORKLOAD = 3
OPENING = 16  # workloads opening their streams at once (48 connects, under the backlog)
PR_SET_PDEATHSIG = 1
PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
PEM_END = b"-----END CERTIFICATE-----"
ISSUED = re.compile(
    r"^(?P<ts>\S+) INFO sds\.provider svid\.issued .*?serial=(?P<serial>[0-9a-f]+) "
    r".*?pid=(?P<pid>\d+)"
)


# --------------------------------------------------------------------------- callers


class Callers:
    """N forked children, each a workload: on command, connects 3 sockets and hands them over."""

    def __init__(self, n: int) -> None:
        self.pids: list[int] = []
        self.control: list[int] = []  # write ends of each child's command pipe
        self.channels: list[socket.socket] = []  # our ends of each child's socketpair
        inherited: list[int] = []
        for _ in range(n):
            read_end, write_end = os.pipe()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            pid = os.fork()
            if pid == 0:  # the child: never returns
                for fd in (*inherited, write_end, ours.fileno()):
                    with contextlib.suppress(OSError):
                        os.close(fd)
                _child(read_end, theirs)
            os.close(read_end)
            theirs.close()
            self.pids.append(pid)
            self.control.append(write_end)
            self.channels.append(ours)
            inherited += [write_end, ours.fileno()]

    def connect(self, k: int, path: Path) -> None:
        """Tell child ``k`` to connect STREAMS_PER_WORKLOAD sockets to ``path``."""
        os.write(self.control[k], str(path).encode() + b"\n")

    async def receive(self, k: int, seconds: float = 30.0) -> list[socket.socket]:
        """The sockets child ``k`` connected (SCM_RIGHTS), as our own socket objects."""
        chan = self.channels[k]
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(chan.fileno(), readable)
        try:
            async with asyncio.timeout(seconds):
                await ready
        finally:
            loop.remove_reader(chan.fileno())
        msg, fds, _, _ = socket.recv_fds(chan, 16, STREAMS_PER_WORKLOAD)
        if msg != b"ok" or len(fds) != STREAMS_PER_WORKLOAD:
            for fd in fds:
                os.close(fd)
            raise RuntimeError(f"caller {k}: {msg.decode(errors='replace')}")
        return [socket.socket(fileno=fd) for fd in fds]

    def close(self) -> None:
        """EOF on every command pipe, SIGKILL, reap."""
        for fd in self.control:
            with contextlib.suppress(OSError):
                os.close(fd)
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self.pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for chan in self.channels:
            chan.close()


def _child(commands: int, parent: socket.socket) -> None:
    """A workload process: connect on each command line, hand the fds over, exit on EOF."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        buffer = b""
        while True:
            chunk = os.read(commands, 4096)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                socks = []
                try:
                    for _ in range(STREAMS_PER_WORKLOAD):
                        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        socks.append(s)
                        s.connect(line.decode())
                    socket.send_fds(parent, [b"ok"], [s.fileno() for s in socks])
                except OSError as exc:
                    parent.sendall(f"connect: {exc}".encode()[:16])
                finally:
                    for s in socks:
                        s.close()
    finally:
        os._exit(0)


class AdoptedChannel(Channel):
    """A grpclib Channel over one already-connected Unix socket (no reconnect)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(path="adopted", codec=RawCodec())
        self._adopted: socket.socket | None = sock

    async def _create_connection(self) -> H2Protocol:
        sock, self._adopted = self._adopted, None
        if sock is None:
            raise ConnectionError("the adopted socket is closed")
        sock.setblocking(False)
        _, protocol = await self._loop.create_unix_connection(self._protocol_factory, sock=sock)
        return protocol


# --------------------------------------------------------------------------- streams


def parse(raw: bytes) -> tuple[bytes | None, str, str]:
    """(leaf PEM of the first TLS certificate Secret or None, version_info, nonce) of a
    serialized DiscoveryResponse (parsed once: this process reads every stream's responses)."""
    response = discovery_pb2.DiscoveryResponse.FromString(raw)
    return _leaf(response), response.version_info, response.nonce


def _leaf(response: Any) -> bytes | None:
    for resource_any in response.resources:
        secret = secret_pb2.Secret.FromString(resource_any.value)
        if secret.HasField("tls_certificate"):
            chain: bytes = secret.tls_certificate.certificate_chain.inline_bytes
            end = chain.find(PEM_END)
            start = chain.find(PEM_BEGIN)
            if start >= 0 and end > start:
                return chain[start : end + len(PEM_END)]
    return None


@dataclass
class Stream:
    workload: int
    names: list[str]
    leaf: bytes | None = None
    armed: bool = False
    arrived: float | None = None  # time.time() of the first new leaf after arming
    error: str | None = None


class Load:
    """All streams of one case: opened over the children's sockets, ACKing every response."""

    def __init__(self, callers: Callers, n: int, sock: Path, ids: list[str]) -> None:
        self.callers = callers
        self.n = n
        self.sock = sock
        self.ids = ids  # the SPIFFE ID each workload's streams should hold
        self.streams = [
            Stream(k, names)
            for k in range(n)
            for names in (["default"], [ids[k]], ["default", "ROOTCA"])
        ]
        self.channels: list[Channel] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.wake = asyncio.Event()

    async def open(self, seconds: float) -> float:
        """Open every stream (OPENING workloads at a time); seconds until all had a leaf."""
        gate = asyncio.Semaphore(OPENING)
        started = time.monotonic()

        async def workload(k: int) -> None:
            async with gate:
                self.callers.connect(k, self.sock)
                socks = await self.callers.receive(k)
                mine = self.streams[k * STREAMS_PER_WORKLOAD : (k + 1) * STREAMS_PER_WORKLOAD]
                for s, sock in zip(mine, socks, strict=True):
                    channel = AdoptedChannel(sock)
                    self.channels.append(channel)
                    self.tasks.append(asyncio.create_task(self.run(s, channel)))
                await self.until(lambda: all(s.leaf is not None for s in mine), seconds)

        await asyncio.gather(*(workload(k) for k in range(self.n)))
        return time.monotonic() - started

    async def run(self, s: Stream, channel: Channel) -> None:
        node_id = f"w{s.workload}-{'+'.join(s.names)}"
        try:
            async with channel.request(
                f"{SDS_SERVICE}/StreamSecrets", Cardinality.STREAM_STREAM, bytes, bytes
            ) as stream:
                await stream.send_message(discovery_request(s.names, node_id=node_id))
                while True:
                    raw = await stream.recv_message()
                    if raw is None:
                        break
                    now = time.time()
                    leaf, version, nonce = parse(raw)
                    if leaf is not None and leaf != s.leaf:
                        if s.armed and s.arrived is None:
                            s.arrived = now
                        s.leaf = leaf
                        self.wake.set()
                    await stream.send_message(
                        discovery_request(s.names, version=version, nonce=nonce)
                    )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            s.error = repr(exc)
            self.wake.set()
        s.error = s.error or "stream ended"
        self.wake.set()

    async def until(self, condition: Any, seconds: float) -> None:
        """Wait until ``condition()`` (re-checked on every leaf change); raise on a stream error."""
        async with asyncio.timeout(seconds):
            while not condition():
                failed = [s for s in self.streams if s.error is not None]
                if failed:
                    raise RuntimeError(
                        f"stream of workload {failed[0].workload}: {failed[0].error}"
                    )
                self.wake.clear()
                await self.wake.wait()

    def check_identities(self) -> dict[int, int]:
        """Each workload's serial, after checking its 3 streams hold one leaf for its own ID."""
        serials: dict[int, int] = {}
        for k in range(self.n):
            mine = self.streams[k * STREAMS_PER_WORKLOAD : (k + 1) * STREAMS_PER_WORKLOAD]
            leaves = {s.leaf for s in mine}
            if len(leaves) != 1:
                raise RuntimeError(f"workload {k}: its streams hold {len(leaves)} different leaves")
            leaf = leaves.pop()
            assert leaf is not None
            cert = x509.load_pem_x509_certificate(leaf)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
            if uris != [self.ids[k]]:
                raise RuntimeError(f"workload {k}: holds {uris}, expected [{self.ids[k]}]")
            serials[k] = cert.serial_number
        return serials

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.channels:
            channel.close()


# --------------------------------------------------------------------------- provider


def identities_yaml(pids: list[int], ttl: str) -> str:
    """The bridge's identity (uid 0, not a child) and one identity per child pid."""
    docs = [
        "kind: workload_identity\nversion: v1\nmetadata: {name: bridge}\n"
        f"spec:\n  spiffe: {{id: /bridge, hint: bridge, x509: {{maximum_ttl: {ttl}}}}}\n"
        "  rules: {allow: [{conditions: [{attribute: workload.unix.uid, eq: {value: 0}}, "
        f"{{attribute: workload.unix.pid, not_in: {{values: {pids}}}}}]}}]}}\n"
    ]
    for k, pid in enumerate(pids):
        docs.append(
            f"kind: workload_identity\nversion: v1\nmetadata: {{name: w{k}}}\n"
            f"spec:\n  spiffe: {{id: /w/{k}, hint: w{k}, x509: {{maximum_ttl: {ttl}}}}}\n"
            "  rules: {allow: [{conditions: [{attribute: workload.unix.pid, "
            f"eq: {{value: {pid}}}}}]}}]}}\n"
        )
    return "---\n".join(docs)


TTLS = ("1h", "3599s")


class Provider:
    def __init__(self, procs: Procs, wd: Path, pids: list[int]) -> None:
        self.wd = wd
        self.pids = pids
        self.ids_path = wd / "identities.yaml"
        self.ttl = 0
        self.ids_path.write_text(identities_yaml(pids, TTLS[self.ttl]))
        (wd / "wl").mkdir(mode=0o700)
        (wd / "admin").mkdir(mode=0o700)
        self.workload = wd / "wl" / "w.sock"
        self.admin = wd / "admin" / "a.sock"
        self.proc = procs.start(
            sds_argv(
                "workload-api",
                "--socket",
                str(self.workload),
                "--trust-domain",
                TD,
                "--identities",
                str(self.ids_path),
                "--ephemeral",
                "--admin-socket",
                str(self.admin),
                "--authorized-delegate",
                BRIDGE_ID,
            ),
            "provider",
        )
        self.log = procs.log_path(self.proc)
        wait_until(
            lambda: "provider.admin_ready" in self.log.read_text(), 30, "provider", self.proc
        )

    def log_size(self) -> int:
        return self.log.stat().st_size

    def rotate(self) -> float:
        """Toggle every identity's lifetime and SIGHUP; the time.time() of the signal."""
        self.ttl = 1 - self.ttl
        tmp = self.ids_path.with_suffix(".tmp")
        tmp.write_text(identities_yaml(self.pids, TTLS[self.ttl]))
        tmp.replace(self.ids_path)
        sent = time.time()
        os.kill(self.proc.pid, signal.SIGHUP)
        return sent

    def issued_since(self, offset: int) -> dict[int, tuple[float, int]]:
        """serial -> (time.time() of its svid.issued line, pid) for lines after ``offset``."""
        with self.log.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
        out: dict[int, tuple[float, int]] = {}
        for line in text.splitlines():
            m = ISSUED.match(line)
            if m:
                ts = dt.datetime.fromisoformat(m["ts"]).timestamp()
                out[int(m["serial"], 16)] = (ts, int(m["pid"]))
        return out


# --------------------------------------------------------------------------- cases


@dataclass
class CaseRun:
    case: str
    run: int
    rss0_kb: int = 0
    rss_all_kb: int = 0
    rss_after_kb: int = 0
    open_s: float = 0.0
    # Per measured rotation:
    workload_p50_ms: list[float] = field(default_factory=list)
    workload_p90_ms: list[float] = field(default_factory=list)
    workload_max_ms: list[float] = field(default_factory=list)
    last_after_first_mint_ms: list[float] = field(default_factory=list)
    last_after_hup_ms: list[float] = field(default_factory=list)
    mint_span_ms: list[float] = field(default_factory=list)
    bridge_cpu_s: list[float] = field(default_factory=list)
    provider_cpu_s: list[float] = field(default_factory=list)
    client_cpu_s: list[float] = field(default_factory=list)  # this process: all the streams
    # Every workload's T0 -> last stream (ms), per measured rotation.
    workload_ms: list[list[float]] = field(default_factory=list)

    @property
    def kb_per_workload(self) -> float:
        return (self.rss_all_kb - self.rss0_kb) / self.n if self.n else float("nan")

    n: int = 0


async def run_case(
    case: str,
    run: int,
    args: argparse.Namespace,
    *,
    wd: Path,
    procs: Procs,
    provider: Provider,
    callers: Callers,
) -> CaseRun:
    result = CaseRun(case, run, n=args.workloads)
    d = wd / f"{case}-{run}"
    d.mkdir(mode=0o700)
    sock = d / "sds.sock"
    if case == "per-caller":
        config = d / "sds.yaml"
        config.write_text(
            f"listen: unix://{sock}\n"
            f"per_caller: {{delegated_identity_api: unix://{provider.admin}}}\n"
        )
        argv = sds_argv("run", "--config", str(config), "--admin", "127.0.0.1:0")
        ids = [f"spiffe://{TD}/w/{k}" for k in range(args.workloads)]
    else:
        argv = sds_argv(
            "run",
            "--workload-api",
            f"unix://{provider.workload}",
            "--listen",
            f"unix://{sock}",
            "--admin",
            "127.0.0.1:0",
        )
        ids = [BRIDGE_ID] * args.workloads
    bridge = procs.start(argv, f"bridge-{case}-{run}")
    load: Load | None = None
    try:
        await asyncio.to_thread(wait_until, sock.exists, 30, "bridge SDS socket", bridge)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(wait_idle, bridge.pid)
        result.rss0_kb = rss_kb(bridge.pid)
        load = Load(callers, args.workloads, sock, ids)
        result.open_s = await load.open(seconds=120)
        serials = load.check_identities()
        await asyncio.to_thread(wait_idle, bridge.pid, 0.3, 120)
        result.rss_all_kb = rss_kb(bridge.pid)
        print(
            f"  {case} run {run + 1}: {args.workloads} workloads x {STREAMS_PER_WORKLOAD} streams "
            f"open in {result.open_s:.1f} s; RSS {result.rss0_kb / 1024:.1f} -> "
            f"{result.rss_all_kb / 1024:.1f} MB",
            flush=True,
        )
        for r in range(args.warmup + args.rotations):
            for s in load.streams:
                s.armed, s.arrived = True, None
            offset = provider.log_size()
            ticks0 = cpu_ticks(bridge.pid)
            provider0 = cpu_ticks(provider.proc.pid)
            client0 = _self_cpu()
            hup = provider.rotate()
            await load.until(lambda: all(s.arrived is not None for s in load.streams), 60)
            await asyncio.to_thread(wait_idle, bridge.pid, 0.3, 120)
            cpu = (cpu_ticks(bridge.pid) - ticks0) / CLK_TCK
            provider_cpu = (cpu_ticks(provider.proc.pid) - provider0) / CLK_TCK
            client_cpu = _self_cpu() - client0
            new = load.check_identities()
            issued = provider.issued_since(offset)
            per_workload = []
            t0s = []
            for k in range(args.workloads):
                if new[k] == serials[k]:
                    raise RuntimeError(f"{case}: workload {k} did not rotate")
                if new[k] not in issued:
                    raise RuntimeError(f"{case}: serial {new[k]:x} not in the provider's log")
                t0 = issued[new[k]][0]
                t0s.append(t0)
                mine = load.streams[k * STREAMS_PER_WORKLOAD : (k + 1) * STREAMS_PER_WORKLOAD]
                per_workload.append((max(s.arrived or 0.0 for s in mine) - t0) * 1000)
            serials = new
            last = max(s.arrived or 0.0 for s in load.streams)
            s_ = summary(per_workload)
            print(
                f"  {case} rotation {r + 1}: per workload p50 {s_['p50']:.0f}, p90 "
                f"{s_['p90']:.0f}, max {s_['max']:.0f} ms; last stream "
                f"{(last - min(t0s)) * 1000:.0f} ms after the first mint, "
                f"{(last - hup) * 1000:.0f} ms after SIGHUP; "
                f"CPU s: bridge {cpu:.2f}, provider {provider_cpu:.2f}, streams {client_cpu:.2f}"
                + ("  [warm-up]" if r < args.warmup else ""),
                flush=True,
            )
            if r < args.warmup:
                continue
            result.workload_p50_ms.append(s_["p50"])
            result.workload_p90_ms.append(s_["p90"])
            result.workload_max_ms.append(s_["max"])
            result.last_after_first_mint_ms.append((last - min(t0s)) * 1000)
            result.last_after_hup_ms.append((last - hup) * 1000)
            result.mint_span_ms.append((max(t0s) - min(t0s)) * 1000)
            result.bridge_cpu_s.append(cpu)
            result.provider_cpu_s.append(provider_cpu)
            result.client_cpu_s.append(client_cpu)
            result.workload_ms.append(sorted(round(x, 2) for x in per_workload))
        result.rss_after_kb = rss_kb(bridge.pid)
        return result
    finally:
        if load is not None:
            await load.close()
        procs.stop(bridge)


def _self_cpu() -> float:
    """User + system CPU seconds of this process (every stream's client side)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- report


def med(values: list[float]) -> float:
    return summary(values)["p50"] if values else float("nan")


def report(args: argparse.Namespace, info: dict[str, Any], runs: list[CaseRun]) -> dict[str, Any]:
    cases = ("shared", "per-caller")
    by: dict[str, list[CaseRun]] = {c: [r for r in runs if r.case == c] for c in cases}

    def m(case: str, attr: str) -> float:
        """Median over runs of each run's median over rotations (or of a per-run scalar)."""
        values = []
        for r in by[case]:
            v = getattr(r, attr)
            values.append(med(v) if isinstance(v, list) else float(v))
        return med(values)

    n = args.workloads
    mem_rows = []
    for c in cases:
        mem_rows.append(
            [
                c,
                m(c, "rss0_kb") / 1024,
                m(c, "rss_all_kb") / 1024,
                m(c, "rss_after_kb") / 1024,
                m(c, "kb_per_workload"),
                ratio(m(c, "kb_per_workload"), m("shared", "kb_per_workload")),
                m(c, "open_s"),
            ]
        )
    print(
        f"\nBridge memory, {n} workloads x {STREAMS_PER_WORKLOAD} streams "
        f"(median of {args.runs} runs)"
    )
    print(
        table(
            [
                "bridge",
                "RSS 0 callers MB",
                "RSS all open MB",
                "RSS after rotations MB",
                "KB per workload",
                "per workload / shared",
                "open time s",
            ],
            mem_rows,
        )
    )
    rot_rows = []
    for c in cases:
        rot_rows.append(
            [
                c,
                m(c, "workload_p50_ms"),
                m(c, "workload_p90_ms"),
                m(c, "workload_max_ms"),
                m(c, "last_after_first_mint_ms"),
                m(c, "mint_span_ms"),
                m(c, "last_after_hup_ms"),
                m(c, "bridge_cpu_s"),
                m(c, "provider_cpu_s"),
                m(c, "client_cpu_s"),
            ]
        )
    print(
        f"\nOne rotation of every workload (SIGHUP), T0 = the provider's svid.issued line for the "
        f"serial served (ms; median over {args.runs} runs of the median of {args.rotations} "
        f"rotations)"
    )
    print(
        table(
            [
                "bridge",
                "per workload p50",
                "p90",
                "max",
                "last stream after first mint",
                "provider mint span",
                "last stream after SIGHUP",
                "bridge CPU s",
                "provider CPU s",
                "streams' CPU s",
            ],
            rot_rows,
        )
    )
    info["loadavg_at_end"] = os.getloadavg()
    print(
        f"\nload average at start {info['loadavg_at_start'][0]:.2f}, at end "
        f"{info['loadavg_at_end'][0]:.2f} (1 min)"
    )
    result = {
        "benchmark": "per_caller",
        "machine": info,
        "args": vars(args),
        "summary": {
            c: {
                attr: m(c, attr)
                for attr in (
                    "rss0_kb",
                    "rss_all_kb",
                    "rss_after_kb",
                    "kb_per_workload",
                    "open_s",
                    "workload_p50_ms",
                    "workload_p90_ms",
                    "workload_max_ms",
                    "last_after_first_mint_ms",
                    "mint_span_ms",
                    "last_after_hup_ms",
                    "bridge_cpu_s",
                    "provider_cpu_s",
                    "client_cpu_s",
                )
            }
            for c in cases
        },
        "runs": [{**vars(r), "kb_per_workload": r.kb_per_workload} for r in runs],
    }
    if not args.quick and not args.no_summary:
        _common.write_summary(SUMMARY, PLOT, result, lambda: plot(result))
    return result


def plot(result: dict[str, Any]) -> None:
    """Per-workload rotation latency CDFs (every measured rotation of every run) and memory."""
    plt = _common.pyplot()
    if plt is None:
        return
    colors = {"shared": "#7f7f7f", "per-caller": "#1f77b4"}
    labels = {"shared": "shared bridge (baseline)", "per-caller": "per-caller bridge"}
    n = result["args"]["workloads"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), width_ratios=(2, 1))
    for case in ("shared", "per-caller"):
        values = sorted(
            v for r in result["runs"] if r["case"] == case for rot in r["workload_ms"] for v in rot
        )
        if not values:
            continue
        left.step(
            values,
            [(i + 1) / len(values) for i in range(len(values))],
            where="post",
            color=colors[case],
            linewidth=2,
            label=f"{labels[case]}: p50 {summary(values)['p50']:.0f} ms, "
            f"max {values[-1]:.0f} ms (n={len(values)})",
        )
    left.set_xlabel("provider mints a workload's SVID -> the last of its 3 streams has it (ms)")
    left.set_ylabel("fraction of workload rotations")
    left.set_ylim(0, 1.02)
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    left.set_title(f"{n} workloads rotated at once (SIGHUP)", fontsize=10)
    cases = ("shared", "per-caller")
    summ = result["summary"]
    kb = [summ[c]["kb_per_workload"] for c in cases]
    bars = right.bar(
        [labels[c].split(" (")[0] for c in cases], kb, color=[colors[c] for c in cases]
    )
    for bar, value in zip(bars, kb, strict=True):
        right.annotate(
            f"{value:.0f} KB", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom"
        )
    right.set_ylim(0, max(kb) * 1.15)
    right.set_ylabel("bridge RSS per workload (3 streams), KB")
    right.set_title("(RSS all open - RSS 0 callers) / workloads", fontsize=10)
    right.tick_params(axis="x", labelsize=8)
    right.grid(True, axis="y", alpha=0.3)
    machine_info = result["machine"]
    load = ", ".join(f"{x:.1f}" for x in machine_info["loadavg_at_start"])
    fig.text(
        0.01,
        0.01,
        f"commit {machine_info['code']['commit']}, {machine_info['date_utc']}, "
        f"{machine_info['nproc']} CPU, load average at start {load}; "
        f"median of {result['args']['runs']} runs",
        fontsize=7,
        color="#555555",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=100, metadata={"Software": None})  # same JSON -> same bytes
    plt.close(fig)


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def run(args: argparse.Namespace) -> dict[str, Any]:
    soft, hard = raise_nofile()
    info = machine()
    info["nofile"] = [soft, hard]
    print(machine_line(info) + f"; RLIMIT_NOFILE {soft}/{hard}", flush=True)
    # Fork the workloads first: before any thread, event loop or subprocess pipe exists.
    callers = Callers(args.workloads)
    try:
        with workspace() as wd, Procs(wd) as procs:
            provider = Provider(procs, wd, callers.pids)
            runs = asyncio.run(_runs(args, wd, procs, provider, callers))
            return report(args, info, runs)
    finally:
        callers.close()


async def _runs(
    args: argparse.Namespace, wd: Path, procs: Procs, provider: Provider, callers: Callers
) -> list[CaseRun]:
    out = []
    for r in range(args.runs):
        # Alternate the order so a drift in machine load does not favour one case.
        order = ("shared", "per-caller") if r % 2 == 0 else ("per-caller", "shared")
        for case in order:
            print(f"case {case}, run {r + 1}/{args.runs}", flush=True)
            out.append(
                await run_case(
                    case, r, args, wd=wd, procs=procs, provider=provider, callers=callers
                )
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 workloads, 2 runs, 1 rotation")
    parser.add_argument("--workloads", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--rotations", type=int, default=None, help="measured rotations per case")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-summary", action="store_true", help="leave docs/bench/ alone")
    parser.add_argument("--plot-only", action="store_true", help="redraw docs/bench/per_caller.png")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(SUMMARY.read_text()))
        print(f"plot: {PLOT.relative_to(_common.REPO)}")
        return 0
    if args.workloads is None:
        args.workloads = 20 if args.quick else 100
    if args.runs is None:
        args.runs = 2 if args.quick else 3
    if args.rotations is None:
        args.rotations = 1 if args.quick else 3
    return run_benchmark("per_caller", run, args)


if __name__ == "__main__":
    sys.exit(main())
