"""In-process cost of each step the bridge takes for one rotation (CPU only, no I/O).

Uses the bridge's own classes (read-only): the Workload API message decode,
``Watcher._apply_x509`` (parse + verify every SVID, compare, notify),
``Bridge.refresh`` (build specs, digest, cache update, log lines), the
``Secret`` rendering (xds-protos), the response assembly from the cached
``Secret`` bytes (``sotw_response`` + serialize, what grpclib's ProtoCodec
sends), and the decode of an incoming DiscoveryRequest for a minimal request
and for a real Envoy's: with the lite message the server uses (Node as bytes)
and, for comparison, with xds-protos' full ``DiscoveryRequest``.
Logging goes to /dev/null at INFO, as formatted lines, like ``sds run``.
"""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import discovery_request, load_material, percentile


def _time(fn: Callable[[int], Any], n: int) -> dict[str, float]:
    """Time ``fn(i)`` for i < n (the first call, which fills lazy caches, reported apart as
    ``cold_ms``); also count full (generation 2) GC runs that hit the loop."""
    samples = []
    full = [0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info.get("generation") == 2:
            full[0] += 1

    gc.callbacks.append(on_gc)
    try:
        for i in range(n):
            start = time.perf_counter()
            fn(i)
            samples.append((time.perf_counter() - start) * 1000)
    finally:
        gc.callbacks.remove(on_gc)
    cold, warm = samples[0], samples[1:]
    return {
        "cold_ms": cold,
        "p50_ms": percentile(warm, 50),
        "p99_ms": percentile(warm, 99),
        "max_ms": max(warm),
        "n": len(warm),
        "gc2": full[0],
    }


def full_gc_ms(repeat: int = 5) -> float:
    """Median duration of ``gc.collect()`` in this process (all generations)."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        gc.collect()
        samples.append((time.perf_counter() - start) * 1000)
    return percentile(samples, 50)


def stage_costs(material: Path, envoy_request: bytes | None, n: int = 60) -> dict[str, Any]:
    """Median/p99 milliseconds per stage; ``n`` distinct SVIDs are pushed through."""
    return asyncio.run(_stage_costs(material, envoy_request, n))


async def _stage_costs(material: Path, envoy_request: bytes | None, n: int) -> dict[str, Any]:
    from envoy.service.discovery.v3 import discovery_pb2

    from sds._proto import workload_pb2
    from sds._util.log import configure_logging
    from sds.bridge.config import BridgeConfig
    from sds.bridge.state import Bridge
    from sds.workloadapi.client import _x509_update
    from sds.workloadapi.watcher import Watcher
    from sds.xds import codec as envoy
    from sds.xds.cache import SecretCache
    from sds.xds.codec import LiteRequest, render_secret, sotw_request, sotw_response
    from sds.xds.resources import TlsSpec
    from tests.harness.fake_workload_api import x509_response

    configure_logging("INFO")
    sink = open(os.devnull, "w")  # noqa: ASYNC230, SIM115 - /dev/null, closed below
    handler = logging.getLogger("sds").handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(sink)
    try:
        bundle, svids = load_material(material)
        count = min(n + 1, len(svids) - 1)
        raw = [x509_response([s], [bundle]).SerializeToString() for s in svids]
        messages = [workload_pb2.X509SVIDResponse.FromString(r) for r in raw]
        out: dict[str, Any] = {}
        out["upstream decode (X509SVIDResponse)"] = _time(
            lambda i: workload_pb2.X509SVIDResponse.FromString(raw[i + 1]), count
        )

        watcher = Watcher("unix:///nonexistent/bench.sock")
        watcher._apply_x509(_x509_update(messages[0]))
        out["Watcher._apply_x509 (parse+verify)"] = _time(
            lambda i: watcher._apply_x509(_x509_update(messages[i + 1])), count
        )
        watcher._cancel_timer()

        source = Watcher("unix:///nonexistent/bench.sock")
        contexts = []
        for message in messages:
            source._apply_x509(_x509_update(message))
            contexts.append(source.current())
        source._cancel_timer()
        holder: dict[str, Any] = {}

        class Fixed:
            address = "fixed"
            connected = True

            def current(self) -> Any:
                return holder["ctx"]

            def subscribe(self, callback: Any) -> None:
                pass

        fixed_bridge = Bridge(BridgeConfig(source="bench"), [Fixed()], cache=SecretCache())

        def refresh(i: int) -> None:
            holder["ctx"] = contexts[i + 1]
            fixed_bridge.refresh()

        out["Bridge.refresh (specs+digest+cache+logs)"] = _time(refresh, count)
        full = discovery_pb2.DiscoveryRequest.FromString

        def decode(data: bytes) -> Any:  # what the server does with each request
            return sotw_request(LiteRequest.FromString(data))

        def first(data: bytes) -> Any:  # and once per stream, with the Node
            request = decode(data)
            return envoy.node_info(request.node)

        def full_node(data: bytes) -> Any:
            node = full(data).node
            return node.id, node.cluster, node.metadata.fields.get("x")

        out["render Secret default (xds-protos)"] = _time(
            lambda i: render_secret("default", TlsSpec(svids[i + 1]), trusted_ca=False), count
        )
        body = render_secret("default", TlsSpec(svids[1]), trusted_ca=False)
        out["DiscoveryResponse from cached Secret bytes (+ serialize)"] = _time(
            lambda i: sotw_response("abc-1", [body], f"abc-n{i}").SerializeToString(), count
        )
        minimal = discovery_request(["default"], version="v1", nonce="n1", node_id="load-1")
        out[f"decode minimal ACK, {len(minimal)} B (lite)"] = _time(
            lambda i: decode(minimal), count
        )
        out[f"decode minimal ACK, {len(minimal)} B (full DiscoveryRequest)"] = _time(
            lambda i: full(minimal), count
        )
        if envoy_request is not None:
            size = len(envoy_request)
            out[f"decode real Envoy request, {size} B (lite: Node as bytes)"] = _time(
                lambda i: decode(envoy_request), min(count, 20)
            )
            out["  + node_info() of it (first request of a stream)"] = _time(
                lambda i: first(envoy_request), min(count, 20)
            )
            out[f"decode real Envoy request, {size} B (full DiscoveryRequest)"] = _time(
                lambda i: full(envoy_request), min(count, 20)
            )
            out["  + Node id, cluster, one metadata key of it"] = _time(
                lambda i: full_node(envoy_request), min(count, 20)
            )
        pause = full_gc_ms()
        out["one full gc.collect() with sds run's modules loaded"] = {
            "cold_ms": math.nan,
            "p50_ms": pause,
            "p99_ms": math.nan,
            "max_ms": math.nan,
            "n": 5,
            "gc2": 5,
        }
        return out
    finally:
        handler.setStream(io.StringIO())
        sink.close()
