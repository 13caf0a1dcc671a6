"""Benchmark helper: ``sds ARGS`` with an experimental tweak applied, to measure a proposal.

``python bench/_variant.py VARIANT ARGS...``

* ``gc-freeze``: import every module ``sds run`` loads, then ``gc.collect()``
  and ``gc.freeze()`` before running, so the long-lived objects created by
  imports are never scanned again by the cyclic garbage collector (what a
  one-line change at the end of ``sds run``'s start-up would do).
* ``fast-decode``: StreamSecrets requests are decoded by a hand-written
  reader of the fields the servicer uses (version_info 1, node 2,
  resource_names 3, type_url 4, response_nonce 5, error_detail 6) instead
  of envoy-data-plane's (betterproto2) ``DiscoveryRequest``; the ``Node`` is
  read only while the stream has no node yet (``id`` 1, ``cluster`` 2,
  ``metadata`` 3 via protobuf's C ``Struct``, ``user_agent_build_version`` 8)
  and its bytes are dropped right after. The servicer's logic is unchanged:
  ``sds._sds.server.DiscoveryRequest`` and ``node_info`` are swapped, and
  ``SdsServicer._set_node`` releases the node bytes. Delta streams are untouched.
  For checkouts that still decode requests with envoy-data-plane.
* ``release-request``: for checkouts with the hand-written request decoder
  (``SdsServicer._decode``, ``RawMessage``): the request bytes are emptied
  right after decoding and the decoded ``node`` bytes right after
  ``_set_node``, so a stream keeps neither while it waits for the next
  request (what ``del raw, request`` in the stream loops would do).

Not the shipped code: results are labelled "what-if" in the reports.
"""

from __future__ import annotations

import gc
import sys
from typing import Any


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(number, wire type, value) for each top-level field; value is int or bytes."""
    out = []
    i, n = 0, len(data)
    while i < n:
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
            out.append((number, wire, value))
        elif wire == 2:
            length, i = _varint(data, i)
            out.append((number, wire, data[i : i + length]))
            i += length
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


class _Status:
    """google.rpc.Status: code 1, message 2."""

    def __init__(self, data: bytes) -> None:
        self.code = 0
        self.message = ""
        for number, wire, value in _fields(data):
            if number == 1 and wire == 0:
                self.code = value
            elif number == 2 and wire == 2:
                self.message = bytes(value).decode("utf-8", "replace")


class _NodeRef:
    """The raw Node bytes of one request; released once the stream has its node."""

    def __init__(self, raw: bytes) -> None:
        self.raw: bytes | None = raw


class FastDiscoveryRequest:
    """The DiscoveryRequest fields SdsServicer reads, decoded without message classes."""

    __slots__ = (
        "error_detail",
        "node",
        "resource_names",
        "response_nonce",
        "type_url",
        "version_info",
    )

    def __init__(self) -> None:
        self.version_info = ""
        self.node: _NodeRef | None = None
        self.resource_names: list[str] = []
        self.type_url = ""
        self.response_nonce = ""
        self.error_detail: _Status | None = None

    @classmethod
    def FromString(cls, data: bytes) -> FastDiscoveryRequest:
        request = cls()
        for number, wire, value in _fields(bytes(data)):
            if wire != 2:
                continue
            if number == 1:
                request.version_info = value.decode()
            elif number == 2:
                request.node = _NodeRef(value)
            elif number == 3:
                request.resource_names.append(value.decode())
            elif number == 4:
                request.type_url = value.decode()
            elif number == 5:
                request.response_nonce = value.decode()
            elif number == 6:
                request.error_detail = _Status(value)
        return request


def _flag(struct_bytes: bytes, key: str) -> bool | None:
    from google.protobuf import struct_pb2

    value = struct_pb2.Struct.FromString(struct_bytes).fields.get(key)
    if value is None:
        return None
    kind = value.WhichOneof("kind")
    if kind == "bool_value":
        return bool(value.bool_value)
    if kind == "string_value":
        lowered = value.string_value.strip().lower()
        if lowered in ("1", "t", "true", "yes", "on"):
            return True
        if lowered in ("0", "f", "false", "no", "off"):
            return False
    return None


def fast_node_info(node: Any) -> Any:
    """NodeInfo from raw Node bytes (id 1, cluster 2, metadata 3, user_agent_build_version 8)."""
    from sds._sds.envoy import NodeInfo

    if node is None or node.raw is None:
        return None
    node_id = cluster = build = ""
    disable: bool | None = None
    for number, wire, value in _fields(node.raw):
        if wire != 2:
            continue
        if number == 1:
            node_id = value.decode()
        elif number == 2:
            cluster = value.decode()
        elif number == 3:
            disable = _flag(value, "disable_spiffe_cert_validation")
        elif number == 8:
            for vnum, vwire, vval in _fields(value):
                if vnum == 1 and vwire == 2:
                    parts = {n: v for n, w, v in _fields(vval) if w == 0}
                    build = f"{parts.get(1, 0)}.{parts.get(2, 0)}.{parts.get(3, 0)}"
    return NodeInfo(id=node_id, cluster=cluster, build_version=build, disable_spiffe=disable)


def _apply_fast_decode() -> None:
    from sds._sds import server

    server.DiscoveryRequest = FastDiscoveryRequest  # type: ignore[misc,assignment]
    server.node_info = fast_node_info  # type: ignore[assignment]

    def set_node(self: Any, info: Any, node: Any) -> None:
        if info.node is None:
            info.node = fast_node_info(node)
        if node is not None:
            node.raw = None  # do not keep ~60 KB per stream in the coroutine frame

    server.SdsServicer._set_node = set_node  # type: ignore[method-assign]


class _Holder:
    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw: bytes | None = raw


def _apply_release_request() -> None:
    from sds._sds import server

    original_codec_decode = server.PassthroughCodec.decode
    original_decode = server.SdsServicer._decode
    original_set_node = server.SdsServicer._set_node

    def codec_decode(self: Any, data: bytes, message_type: Any) -> Any:
        if message_type is server.RawMessage:
            return bytearray(data)  # emptied by decode() below once decoded
        return original_codec_decode(self, data, message_type)

    def decode(raw: Any, decoder: Any) -> Any:
        request = original_decode(bytes(raw), decoder)
        if isinstance(raw, bytearray):
            raw.clear()
        if getattr(request, "node", None) is not None:
            request.node = _Holder(request.node)
        return request

    def set_node(self: Any, info: Any, node: Any) -> None:
        raw = None
        if node is not None:
            raw, node.raw = node.raw, None
        original_set_node(self, info, raw)

    server.PassthroughCodec.decode = codec_decode  # type: ignore[method-assign]
    server.SdsServicer._decode = staticmethod(decode)  # type: ignore[method-assign,assignment]
    server.SdsServicer._set_node = set_node  # type: ignore[method-assign]


def run() -> int:
    variant = sys.argv[1]
    if variant not in ("gc-freeze", "fast-decode", "release-request"):
        print(f"unknown variant {variant!r}", file=sys.stderr)
        return 2
    import grpclib.server  # noqa: F401
    import prometheus_client  # noqa: F401

    import sds._sds.admin
    import sds._sds.bridge
    import sds._sds.command
    import sds._sds.metrics
    import sds._sds.server
    import sds._workloadapi
    from sds.cli import main

    if variant == "gc-freeze":
        gc.collect()
        gc.freeze()
    elif variant == "fast-decode":
        if not hasattr(sds._sds.server, "DiscoveryRequest"):
            print("fast-decode: this sds already decodes requests itself", file=sys.stderr)
            return 2
        _apply_fast_decode()
    else:
        if not hasattr(sds._sds.server, "RawMessage"):
            print("release-request: this sds has no hand-written request decoder", file=sys.stderr)
            return 2
        _apply_release_request()
    return main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(run())
