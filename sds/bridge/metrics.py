"""Prometheus metrics for ``sds run``: the implementation of the server and upstream event seams.

Expiry is exported as an absolute timestamp
(``sds_svid_not_after_timestamp_seconds``; every Unix-time gauge ends in
``_timestamp_seconds``), not a TTL gauge, so alerts are
``sds_svid_not_after_timestamp_seconds - time() < 600``.

Series labelled by Envoy node follow the node: they are removed when the
node's last stream closes, and at most :data:`MAX_NODE_SERIES` node values
are tracked at once; streams of further nodes are counted under
``node="_other"`` (a log line says so once per node). ``sds inspect`` streams
are not nodes and get no per-node series. No ``*_created`` series are
exported.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sds._util.log import event
from sds._util.peercred import PeerCredentials
from sds.bridge.upstreams import UpstreamView
from sds.spiffe.x509 import X509Context
from sds.xds.service import StreamInfo

__all__ = ["MAX_NODE_SERIES", "OTHER_NODE", "Metrics", "UpstreamEvents"]

#: Distinct ``node`` label values held at once; more nodes share :data:`OTHER_NODE`.
MAX_NODE_SERIES = 1000
OTHER_NODE = "_other"

log = logging.getLogger("sds.metrics")


def _build_version() -> str:
    from sds import __version__  # noqa: PLC0415 - the one version string (sds --version)

    return __version__


class _AckedInfo(Collector):
    """``sds_envoy_acked_info{node,secret,version,serial}`` = 1, from the live ACK table."""

    def __init__(self, acked: dict[tuple[str, str], tuple[str, str]]) -> None:
        self._acked = acked

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "sds_envoy_acked_info",
            "1 for the version and serial each Envoy node last ACKed per secret",
            labels=["node", "secret", "version", "serial"],
        )
        for (node, secret), (version, serial) in list(self._acked.items()):
            family.add_metric([node, secret, version, serial], 1)
        yield family


#: What per-caller mode reports per attested process: its label (SPIFFE IDs), its open
#: streams, and (SPIFFE ID, not_after timestamp) of each SVID it is served.
CallerState = tuple[str, int, Iterable[tuple[str, float]]]


class _CallerStreams(Collector):
    """Per-caller mode's series, read at scrape time from the attested callers:
    ``sds_callers``, ``sds_caller_streams{workload}`` and
    ``sds_caller_svid_not_after_timestamp_seconds{spiffe_id}`` (the earliest expiry
    among the processes served that ID, the one an alert must see)."""

    def __init__(self, source: Callable[[], Iterable[CallerState]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "sds_caller_streams",
            "Open SDS streams per attested caller process, labelled with its SPIFFE IDs "
            "(per-caller mode)",
            labels=["workload"],
        )
        callers = GaugeMetricFamily(
            "sds_callers", "Caller processes attested now (per-caller mode)"
        )
        expiry = GaugeMetricFamily(
            "sds_caller_svid_not_after_timestamp_seconds",
            "Unix time at which the SVID served to callers under this SPIFFE ID expires "
            "(the earliest among them; per-caller mode)",
            labels=["spiffe_id"],
        )
        count = 0
        totals: dict[str, int] = {}
        earliest: dict[str, float] = {}
        for workload, streams, svids in self._source():
            count += 1
            totals[workload] = totals.get(workload, 0) + streams
            for spiffe_id, not_after in svids:
                earliest[spiffe_id] = min(not_after, earliest.get(spiffe_id, not_after))
        for workload, streams in sorted(totals.items()):
            family.add_metric([workload], streams)
        for spiffe_id, not_after in sorted(earliest.items()):
            expiry.add_metric([spiffe_id], not_after)
        callers.add_metric([], count)
        yield callers
        yield family
        yield expiry


class Metrics:
    """Owns a private registry; implements ServerEvents and the Workload API watcher events."""

    def __init__(self, *, max_node_series: int = MAX_NODE_SERIES) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide: no *_created
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.build_info = Gauge(
            "sds_build_info", "Always 1; the bridge's version", ["version"], registry=r
        )
        self.build_info.labels(_build_version()).set(1)
        self.svid_not_after = Gauge(
            "sds_svid_not_after_timestamp_seconds",
            "Unix time at which the served SVID expires",
            ["spiffe_id"],
            registry=r,
        )
        self.rotations = Counter(
            "sds_svid_rotations_total", "SVIDs replaced by a new serial", ["spiffe_id"], registry=r
        )
        self.last_rotation = Gauge(
            "sds_svid_last_rotation_timestamp_seconds",
            "Unix time of the last successful rotation",
            ["spiffe_id"],
            registry=r,
        )
        self.rejected = Counter(
            "sds_svid_rejected_total", "SVIDs from upstream that failed validation", registry=r
        )
        self.expired = Counter(
            "sds_svid_expired_total", "SVIDs withdrawn because they expired", registry=r
        )
        self.bundle_present = Gauge(
            "sds_bundle_present",
            "1 if a bundle is held for the trust domain",
            ["trust_domain"],
            registry=r,
        )
        self.upstream_connected = Gauge(
            "sds_upstream_connected",
            "1 while the X.509-SVID stream from this Workload API address is up",
            ["upstream"],
            registry=r,
        )
        self.upstream_serving = Gauge(
            "sds_upstream_serving",
            "1 for the upstream whose SVID is served for each SPIFFE ID",
            ["upstream", "spiffe_id"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "sds_upstream_errors_total", "Workload API disconnects", ["reason"], registry=r
        )
        self.ready = Gauge(
            "sds_ready", "1 when every configured name can be served now", registry=r
        )
        self.unservable = Gauge(
            "sds_unservable",
            "1 for each configured name that cannot be served now (reason on /readyz)",
            ["name"],
            registry=r,
        )
        self._unservable: set[str] = set()
        self.streams = Gauge("sds_streams", "Connected SDS streams", ["kind"], registry=r)
        self.pushes = Counter("sds_pushes_total", "SDS responses sent", ["node"], registry=r)
        self.acks = Counter("sds_acks_total", "SDS ACKs received", ["node"], registry=r)
        self.nacks = Counter("sds_nacks_total", "SDS NACKs received", ["node"], registry=r)
        self.denials = Counter("sds_denied_total", "SDS callers refused by uid/gid", registry=r)
        self.push_latency = Histogram(
            "sds_push_latency_seconds",
            "Time from a state change to the push on a stream",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        # (node, secret) -> (version, serial); rendered at scrape time by _AckedInfo, so an
        # ACK costs a dict store, not a label-set swap (1,000 Envoys ACK every rotation).
        self._acked: dict[tuple[str, str], tuple[str, str]] = {}
        r.register(_AckedInfo(self._acked))
        self._serials: dict[str, int] = {}
        self._bundles: set[str] = set()  # trust domains ever seen: a lost bundle reads 0
        self.max_node_series = max_node_series
        self._node_streams: dict[str, set[int]] = {}  # node label -> streams using it
        self._stream_node: dict[int, str] = {}  # stream id -> its node label
        self._overflowed: set[str] = set()  # node ids folded into _other (logged once)
        self._serving: set[tuple[str, str]] = set()

    def watch_callers(self, source: Callable[[], Iterable[CallerState]]) -> None:
        """Per-caller mode: export the attested callers' series (see :class:`_CallerStreams`)
        from ``source``, read at scrape time."""
        self.registry.register(_CallerStreams(source))

    def render(self) -> bytes:
        """The exposition text."""
        data: bytes = generate_latest(self.registry)
        return data

    # -- state -------------------------------------------------------------------------------

    def state_changed(self, ctx: X509Context, ready: bool, now: float) -> None:
        """Record expiry, rotations and bundles for a new merged state."""
        self.ready.set(1 if ready else 0)
        seen = set()
        for svid in ctx.svids:
            key = str(svid.spiffe_id)
            seen.add(key)
            self.svid_not_after.labels(key).set(svid.not_after.timestamp())
            previous = self._serials.get(key)
            if previous is not None and previous != svid.serial:
                self.rotations.labels(key).inc()
                self.last_rotation.labels(key).set(now)
            self._serials[key] = svid.serial
        for key in list(self._serials):
            if key not in seen:
                del self._serials[key]
                self.svid_not_after.remove(key)
        held = {td.name for td in ctx.bundles}
        for name in held | self._bundles:
            self.bundle_present.labels(name).set(1 if name in held else 0)
        self._bundles |= held

    def upstreams_changed(self, upstreams: Iterable[UpstreamView]) -> None:
        """Record which upstream serves each SPIFFE ID (connections: :meth:`upstream`)."""
        serving = set()
        for view in upstreams:
            serving |= {(view.upstream, spiffe_id) for spiffe_id in view.serving}
        for labels in self._serving - serving:
            self.upstream_serving.remove(*labels)
        for labels in serving - self._serving:
            self.upstream_serving.labels(*labels).set(1)
        self._serving = serving

    def unservable_changed(self, names: list[str]) -> None:
        """Set ``sds_unservable{name}`` to 1 for ``names``; remove the series of the others."""
        for name in self._unservable - set(names):
            self.unservable.remove(name)
        for name in names:
            self.unservable.labels(name).set(1)
        self._unservable = set(names)

    # -- WatcherEvents -----------------------------------------------------------------------

    def upstream(self, address: str) -> UpstreamEvents:
        """The watcher events of the upstream at ``address``: ``sds_upstream_connected`` is
        per address (0 until its stream is up), the other metrics are shared."""
        self.upstream_connected.labels(address).set(0)
        return UpstreamEvents(self, address)

    def on_connected(self) -> None:
        self.upstream_connected.labels("").set(1)

    def on_disconnected(self, error: Exception) -> None:
        self.upstream_connected.labels("").set(0)
        self.upstream_errors.labels(type(error).__name__).inc()

    def on_x509_update(self, ctx: Any) -> None:
        pass

    def on_svid_rejected(self, error: Exception) -> None:
        self.rejected.inc()

    def on_svid_expired(self, svid: Any) -> None:
        self.expired.inc()

    def on_jwt_bundles_update(self, bundles: Any) -> None:
        pass

    def on_misconfigured(self, error: Exception) -> None:
        self.upstream_errors.labels("misconfigured").inc()

    # -- ServerEvents --------------------------------------------------------------------------

    def _node(self, info: StreamInfo) -> str | None:
        """The ``node`` label for ``info``'s stream (bound on first use), or None for an
        inspector; beyond the cap, new nodes share ``_other``."""
        if info.inspector:
            return None
        label = self._stream_node.get(info.id)
        if label is not None:
            return label
        label = info.node_id
        if label not in self._node_streams and len(self._node_streams) >= self.max_node_series:
            if label not in self._overflowed and len(self._overflowed) < self.max_node_series:
                self._overflowed.add(label)
                event(
                    log,
                    logging.WARNING,
                    "metrics.node_series_capped",
                    node=label[:256],
                    limit=self.max_node_series,
                    label=OTHER_NODE,
                )
            label = OTHER_NODE
        self._stream_node[info.id] = label
        self._node_streams.setdefault(label, set()).add(info.id)
        return label

    def stream_opened(self, info: StreamInfo) -> None:
        self.streams.labels(info.kind).inc()

    def stream_closed(self, info: StreamInfo) -> None:
        self.streams.labels(info.kind).dec()
        label = self._stream_node.pop(info.id, None)
        if label is None:
            return
        streams = self._node_streams.get(label)
        if streams is not None:
            streams.discard(info.id)
            if streams:
                return
            del self._node_streams[label]
        self._overflowed.discard(info.node_id)
        for counter in (self.pushes, self.acks, self.nacks):
            with contextlib.suppress(KeyError):
                counter.remove(label)
        for key in [k for k in self._acked if k[0] == label]:
            del self._acked[key]

    def pushed(self, info: StreamInfo, names: list[str], latency: float) -> None:
        self.push_latency.observe(latency)
        node = self._node(info)
        if node is not None:
            self.pushes.labels(node).inc()

    def acked(self, info: StreamInfo) -> None:
        node = self._node(info)
        if node is None:
            return
        self.acks.labels(node).inc()
        if node == OTHER_NODE:
            return  # many nodes share the label: no per-secret view for them
        serials = info.acked_serials
        for secret, version in info.acked.items():
            self._acked[(node, secret)] = (version, serials.get(secret, ""))

    def nacked(self, info: StreamInfo, message: str) -> None:
        node = self._node(info)
        if node is not None:
            self.nacks.labels(node).inc()

    def denied(self, creds: PeerCredentials | None) -> None:
        self.denials.inc()


class UpstreamEvents:
    """WatcherEvents for one upstream address: its own connected gauge, shared counters."""

    def __init__(self, metrics: Metrics, address: str) -> None:
        self._metrics = metrics
        self._connected = metrics.upstream_connected.labels(address)

    def on_connected(self) -> None:
        self._connected.set(1)

    def on_disconnected(self, error: Exception) -> None:
        self._connected.set(0)
        self._metrics.upstream_errors.labels(type(error).__name__).inc()

    def on_x509_update(self, ctx: Any) -> None:
        self._metrics.on_x509_update(ctx)

    def on_svid_rejected(self, error: Exception) -> None:
        self._metrics.on_svid_rejected(error)

    def on_svid_expired(self, svid: Any) -> None:
        self._metrics.on_svid_expired(svid)

    def on_jwt_bundles_update(self, bundles: Any) -> None:
        self._metrics.on_jwt_bundles_update(bundles)

    def on_misconfigured(self, error: Exception) -> None:
        self._metrics.on_misconfigured(error)
