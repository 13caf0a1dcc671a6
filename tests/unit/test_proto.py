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
