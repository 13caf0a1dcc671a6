"""Shared plumbing for the benchmarks: paths, processes, statistics, machine facts, wire helpers.

Not a test module and not part of the package. Every benchmark script puts
the repository root on ``sys.path`` by importing this module first, so
``sds`` and ``tests.harness`` (the Envoy launcher, the fake Workload API) import;
no benchmark imports a test module.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.discovery.v3 import discovery_pb2  # noqa: E402
from google.protobuf import any_pb2  # noqa: E402
from grpclib.encoding.proto import ProtoCodec  # noqa: E402 - after the sys.path set-up

from sds._proto import discovery_lite_pb2  # noqa: E402
from sds._util.procs import Children, wait_until  # noqa: E402, F401 - wait_until for the scripts

BENCH = REPO / "bench"
RESULTS = BENCH / "results"
PYTHON = sys.executable
SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SDS_SERVICE = "/envoy.service.secret.v3.SecretDiscoveryService"
TRUST_DOMAIN = "example.org"


# --------------------------------------------------------------------------- signals


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so ``finally`` blocks clean up like on Ctrl-C."""

    def _exit(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)


# --------------------------------------------------------------------------- processes


class Procs(Children):
    """Subprocesses of one benchmark run (sds._util.procs.Children), started in the repository."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, cwd=REPO)


def sds_argv(*args: str, profile: Path | None = None) -> list[str]:
    """``python -m sds ARGS``, optionally under cProfile writing to ``profile``."""
    if profile is not None:
        return [PYTHON, "-m", "cProfile", "-o", str(profile), "-m", "sds", *args]
    return [PYTHON, "-m", "sds", *args]


@contextlib.contextmanager
def workspace(prefix: str = "sdsb-") -> Any:
    """A short private directory under /tmp (Unix socket paths must be short); removed after
    success, kept (and announced) after a failure so the logs can be read."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    ok = False
    try:
        yield path
        ok = True
    finally:
        if ok:
            shutil.rmtree(path, ignore_errors=True)
        else:
            print(f"[bench] run failed; logs kept in {path}", file=sys.stderr)


# Bytes read from each process's stdout past the last line returned.
_BUFFERS: weakref.WeakKeyDictionary[subprocess.Popen[bytes], bytearray] = (
    weakref.WeakKeyDictionary()
)


def read_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> dict[str, Any]:
    """Read one JSON line from ``proc``'s stdout within ``timeout`` seconds.

    Reads the pipe unbuffered into a per-process buffer, so lines that arrive
    together are all seen (a buffered readline would hide the second from select).
    """
    import select

    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer = _BUFFERS.setdefault(proc, bytearray())
    deadline = time.monotonic() + timeout
    while True:
        newline = buffer.find(b"\n")
        if newline >= 0:
            line = bytes(buffer[:newline])
            del buffer[: newline + 1]
            message: dict[str, Any] = json.loads(line)
            return message
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
        if ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise RuntimeError(f"{what}: process closed stdout (exit {proc.poll()})")
            buffer.extend(chunk)
        elif proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with code {proc.returncode}")


def send_line(proc: subprocess.Popen[bytes], data: dict[str, Any] | str) -> None:
    """Write one line (JSON unless a str) to ``proc``'s stdin and flush."""
    assert proc.stdin is not None
    text = data if isinstance(data, str) else json.dumps(data)
    proc.stdin.write(text.encode() + b"\n")
    proc.stdin.flush()


# --------------------------------------------------------------------------- /proc


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    return _status_field(pid, "VmRSS")


def hwm_kb(pid: int) -> int:
    """VmHWM (peak RSS) of ``pid`` in KiB."""
    return _status_field(pid, "VmHWM")


def _status_field(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {key}")


def rss_breakdown_kb(pid: int) -> dict[str, int]:
    """RssAnon / RssFile / RssShmem of ``pid`` in KiB."""
    return {k: _status_field(pid, k) for k in ("RssAnon", "RssFile", "RssShmem")}


def wait_idle(pid: int, quiet: float = 0.3, timeout: float = 60.0) -> float:
    """Wait until ``pid`` used no CPU for ``quiet`` seconds; return the seconds waited."""
    start = time.monotonic()
    last = cpu_ticks(pid)
    still_since = time.monotonic()
    while time.monotonic() - start < timeout:
        time.sleep(0.05)
        now = cpu_ticks(pid)
        if now != last:
            last = now
            still_since = time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            break
    return time.monotonic() - start


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def ctx_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of ``pid`` (a proxy for wake-ups)."""
    return _status_field(pid, "voluntary_ctxt_switches") + _status_field(
        pid, "nonvoluntary_ctxt_switches"
    )


def thread_wakeups(pid: int) -> int:
    """Context switches summed over every thread of ``pid``."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, RuntimeError):
            total += _status_field_path(f"/proc/{pid}/task/{tid}/status", "voluntary_ctxt_switches")
            total += _status_field_path(
                f"/proc/{pid}/task/{tid}/status", "nonvoluntary_ctxt_switches"
            )
    return total


def _status_field_path(path: str, key: str) -> int:
    with open(path) as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{path} has no {key}")


CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, min, p50, p90, p99, max, mean of ``values``."""
    return {
        "n": len(values),
        "min": min(values) if values else math.nan,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
        "mean": sum(values) / len(values) if values else math.nan,
    }


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-markdown table."""
    rendered = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rendered)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rendered:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


# The verdict column of a target measured in absolute time: not judged, since
# a shared machine's load moves it; the ratio rows next to it are the verdict.
ABSOLUTE = "info (absolute)"


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


# --------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare runs."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_total = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) // 1024
    from tests.harness.envoy import CURRENT_VERSION

    versions = {}
    for dist in ("grpclib", "h2", "cryptography", "xds_protos", "envoy_data_plane", "protobuf"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "mem_total_mb": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy": CURRENT_VERSION,
        "openssl": ssl.OPENSSL_VERSION,
        "packages": versions,
        "code": code_version(),
        "loadavg_at_start": os.getloadavg(),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def code_version() -> dict[str, Any]:
    """The commit measured, and which files under sds/ differ from it (uncommitted work)."""

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=REPO, check=False, timeout=10
        )
        return result.stdout

    # Porcelain lines are "XY path": the status columns may start with a space.
    changed = [line[3:] for line in git("status", "--porcelain", "--", "sds").splitlines()]
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "subject": git("log", "-1", "--format=%s").strip(),
        "uncommitted_sds_files": changed,
    }


def request_decoding() -> str:
    """How this checkout's SDS server decodes requests: ``envoy-data-plane`` (before
    ``b8c1171``), ``hand-written`` (before xds-protos) or ``xds-protos lite`` (Node as bytes)."""
    from sds.xds import codec, service

    if hasattr(codec, "LiteRequest"):
        return "xds-protos lite"
    return "envoy-data-plane" if hasattr(service, "DiscoveryRequest") else "hand-written"


def machine_line(info: dict[str, Any]) -> str:
    code = info["code"]
    dirty = (
        f" + uncommitted {','.join(code['uncommitted_sds_files'])}"
        if code["uncommitted_sds_files"]
        else ""
    )
    return (
        f"code: {code['commit']} ({code['subject']}){dirty}\n"
        f"machine: {info['nproc']} CPU ({info['cpu_model']}), {info['mem_total_mb']} MB RAM, "
        f"Linux {info['kernel']}, Python {info['python']}, Envoy {info['envoy']}, "
        f"loadavg {', '.join(f'{x:.2f}' for x in info['loadavg_at_start'])}"
    )


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Write ``data`` as bench/results/<name>-<utc stamp>.json and <name>-latest.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{name}-{stamp}.json"
    text = json.dumps(data, indent=2, default=str) + "\n"
    path.write_text(text)
    (RESULTS / f"{name}-latest.json").write_text(text)
    return path


# --------------------------------------------------------------------------- material


def make_material(path: Path, rotations: int, *, ttl_hours: float = 2.0) -> dict[str, Any]:
    """Issue one CA, ``rotations + 1`` server SVIDs (spiffe://example.org/web) and one client
    SVID; write them to ``path`` (0600 JSON, base64 DER) for the helper processes.

    Returns the in-memory view: ``ca_pem``, ``client_cert``/``client_key`` PEM, and
    ``leaf_der``/``leaf_pem``/``serial`` per server SVID.
    """
    from sds.provider.ca import LocalCA
    from sds.spiffe.id import SpiffeId, TrustDomain

    td = TrustDomain(TRUST_DOMAIN)
    ca = LocalCA.ephemeral(td)
    ttl = dt.timedelta(hours=ttl_hours)
    web = SpiffeId.from_path(td, "/web")
    servers = [ca.issue_x509_svid(web, ttl, hint="web") for _ in range(rotations + 1)]
    client = ca.issue_x509_svid(SpiffeId.from_path(td, "/client"), ttl, hint="client")
    bundle = ca.bundle
    from sds.xds.codec import render_secret
    from sds.xds.resources import TlsSpec, ValidationSpec

    doc = {
        # Pre-rendered Secrets (serialized, as the bridge's cache keeps them) for the floor.
        "rendered": {
            "default": [
                _b64(render_secret("default", TlsSpec(s), trusted_ca=False)) for s in servers
            ],
            "ROOTCA": _b64(render_secret("ROOTCA", ValidationSpec((bundle,)), trusted_ca=False)),
        },
        "trust_domain": td.name,
        "bundle_der": _b64(bundle.der()),
        "svids": [
            {
                "spiffe_id": str(s.spiffe_id),
                "chain_der": _b64(s.chain_der()),
                "key_der": _b64(s.key_der()),
                "hint": s.hint,
            }
            for s in servers
        ],
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(doc, handle)
    return {
        "ca_pem": bundle.pem(),
        "client_cert": client.chain_pem(),
        "client_key": client.key_pem(),
        "leaf_der": [s.leaf.public_bytes(_der()) for s in servers],
        "leaf_pem": [s.chain_pem().split(b"-----END CERTIFICATE-----")[0] for s in servers],
        "serial": [s.serial for s in servers],
    }


def _der() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def load_material(path: Path) -> tuple[Any, list[Any]]:
    """(X509Bundle, [X509Svid]) from a file written by :func:`make_material`."""
    from sds.spiffe.id import TrustDomain
    from sds.spiffe.x509 import X509Bundle, X509Svid

    doc = json.loads(path.read_text())
    td = TrustDomain(doc["trust_domain"])
    bundle = X509Bundle.from_der(td, base64.b64decode(doc["bundle_der"]))
    svids = [
        X509Svid.parse(
            s["spiffe_id"],
            base64.b64decode(s["chain_der"]),
            base64.b64decode(s["key_der"]),
            s["hint"],
        )
        for s in doc["svids"]
    ]
    return bundle, svids


# --------------------------------------------------------------------------- TLS probe


class Prober:
    """Fresh mTLS handshakes with Python ssl: one new TCP connection and full handshake per call.

    The client presents its SVID (the listener requires one), verifies the
    server chain against the CA (no hostname: SPIFFE IDs are URI SANs) and
    returns the server leaf's DER. No session resumption: every call is a
    full handshake.
    """

    def __init__(self, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, workdir: Path) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=ca_pem.decode("ascii"))
        cert_path = workdir / "client.crt"
        key_path = workdir / "client.key"
        cert_path.write_bytes(cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key_pem)
        context.load_cert_chain(cert_path, key_path)
        self.context = context
        self.failures = 0

    def leaf_der(self, port: int, timeout: float = 2.0) -> bytes | None:
        """The DER of the leaf the server at 127.0.0.1:``port`` presents (None on failure)."""
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        except OSError:
            self.failures += 1
            return None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.context.wrap_socket(raw) as tls:
                return tls.getpeercert(binary_form=True)
        except (OSError, ssl.SSLError):
            self.failures += 1
            return None
        finally:
            raw.close()


# --------------------------------------------------------------------------- xDS wire


class RawCodec(ProtoCodec):
    """grpclib codec that sends and returns raw protobuf bytes (messages are built and read
    by the caller, only when it needs to)."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return bytes(data)


def request_node(data: bytes) -> bytes | None:
    """The serialized Node of a serialized DiscoveryRequest (None if it has none)."""
    request = discovery_lite_pb2.DiscoveryRequest.FromString(data)
    return request.node if request.HasField("node") else None


def response_fields(data: bytes) -> tuple[str, str]:
    """(version_info, nonce) of a serialized DiscoveryResponse."""
    response = discovery_pb2.DiscoveryResponse.FromString(data)
    return response.version_info, response.nonce


def sotw_response(version: str, secrets: Iterable[bytes], nonce: str) -> bytes:
    """A serialized DiscoveryResponse carrying serialized ``Secret`` messages."""
    return discovery_pb2.DiscoveryResponse(
        version_info=version,
        resources=[any_pb2.Any(type_url=SECRET_TYPE_URL, value=s) for s in secrets],
        type_url=SECRET_TYPE_URL,
        nonce=nonce,
    ).SerializeToString()


def discovery_request(
    names: Sequence[str],
    *,
    version: str = "",
    nonce: str = "",
    node_id: str | None = None,
    cluster: str = "bench",
    node_template: bytes | None = None,
) -> bytes:
    """A serialized DiscoveryRequest (Node id, cluster and user agent name ``bench-load-client``).

    With ``node_template`` (a serialized Node, e.g. a real Envoy's), the node
    is that message with ``id`` overridden, as Envoy sends it: on every request.
    The Node stays bytes (the lite request of ``sds._proto``): a serialized
    message followed by another is their merge, and the last value of a
    singular field wins, so ``template + Node(id=...)`` is the template with a
    new id, without parsing 61 kB per request.
    """
    request = discovery_lite_pb2.DiscoveryRequest(
        version_info=version,
        resource_names=names,
        type_url=SECRET_TYPE_URL,
        response_nonce=nonce,
    )
    if node_id is not None:
        if node_template is not None:
            node = node_template + base_pb2.Node(id=node_id).SerializeToString()
        else:
            node = base_pb2.Node(
                id=node_id, cluster=cluster, user_agent_name="bench-load-client"
            ).SerializeToString()
        request.node = node
    data: bytes = request.SerializeToString()
    return data


def run_benchmark(name: str, run: Callable[[Any], dict[str, Any]], args: Any) -> int:
    """Run one benchmark with signal handling, time it, save and point to its results."""
    install_signal_handlers()
    started = time.monotonic()
    result = run(args)
    result["wall_seconds"] = time.monotonic() - started
    path = write_results(name, result)
    print(f"\nwall time {result['wall_seconds']:.0f} s; results: {path.relative_to(REPO)}")
    return 0


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None (with a hint) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] no plot: pip install matplotlib", file=sys.stderr)
        return None
    return plt


def write_summary(summary: Path, plot_path: Path, result: Any, plot: Callable[[], None]) -> None:
    """Write ``result`` as the committed JSON summary, draw the plot, say where both are."""
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot()
    print(f"summary: {summary.relative_to(REPO)}; plot: {plot_path.relative_to(REPO)}")
