"""The generated Workload API code matches proto/workload.proto."""

from __future__ import annotations

from tests.conftest import REPO


def test_service_path_is_package_less() -> None:
    """The standard's gRPC path is /SpiffeWorkloadAPI/<Method> (no proto package)."""
    text = (REPO / "sds" / "_proto" / "workload_grpc.py").read_text()
    for method in (
        "FetchX509SVID",
        "FetchX509Bundles",
        "FetchJWTSVID",
        "FetchJWTBundles",
        "ValidateJWTSVID",
    ):
        assert f"'/SpiffeWorkloadAPI/{method}'" in text


def test_lite_requests_have_envoys_field_numbers_and_types() -> None:
    """Every field of the lite requests is Envoy's field of that name, number and wire type;
    ``node`` is bytes where Envoy has the Node message (both length-delimited)."""
    from envoy.service.discovery.v3 import discovery_pb2
    from google.protobuf.descriptor import FieldDescriptor

    from sds._proto import discovery_lite_pb2 as lite

    def shape(field: FieldDescriptor) -> tuple[int, int, bool]:
        kind = field.type
        if kind in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_BYTES):
            kind = FieldDescriptor.TYPE_BYTES  # the same wire type and framing
        return field.number, kind, field.is_repeated

    for ours, envoys in (
        (lite.DiscoveryRequest, discovery_pb2.DiscoveryRequest),
        (lite.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest),
    ):
        theirs = envoys.DESCRIPTOR.fields_by_name
        assert ours.DESCRIPTOR.name == envoys.DESCRIPTOR.name
        for field in ours.DESCRIPTOR.fields:
            assert field.name in theirs, field.name
            assert shape(field) == shape(theirs[field.name]), field.name
        status = theirs["error_detail"].message_type
        assert status.full_name == "google.rpc.Status"
        for field in ours.DESCRIPTOR.fields_by_name["error_detail"].message_type.fields:
            assert shape(field) == shape(status.fields_by_name[field.name]), field.name
