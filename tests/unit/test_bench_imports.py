"""What the benchmarks import: no test module, and nothing but grpclib in the floor.

``bench/`` shares the tests' harness (``tests/harness``), never a ``test_*``
module or a conftest. The zero-work SDS server (``bench/_floor.py``) is the
baseline every SDS figure is compared with, so it imports only asyncio,
grpclib and the standard library: a module of ``sds`` (or cryptography,
protobuf, envoy-data-plane) loaded there would move the floor.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import duration_pb2

BENCH = Path(__file__).resolve().parents[2] / "bench"
FLOOR = BENCH / "_floor.py"


def imports_of(path: Path) -> set[str]:
    """The full names of every module ``path`` imports, at any depth in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import in {path.name}: line {node.lineno}"
            assert node.module is not None
            names.add(node.module)
    return names


def imported_modules(path: Path) -> set[str]:
    """The top-level names of every module ``path`` imports, at any depth in the file."""
    return {name.split(".")[0] for name in imports_of(path)}


def load_floor() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_floor", FLOOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_floor_imports_only_the_standard_library_and_grpclib() -> None:
    third_party = imported_modules(FLOOR) - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"grpclib"}


def test_benchmarks_import_the_test_harness_only() -> None:
    from_tests = {
        f"{path.name}: {name}"
        for path in sorted(BENCH.glob("*.py"))
        for name in imports_of(path)
        if name.split(".")[0] == "tests" and not name.startswith("tests.harness")
    }
    assert from_tests == set()
    assert "tests.harness.envoy" in imports_of(BENCH / "rotation.py")


def test_import_check_sees_a_nested_sds_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import asyncio\n\ndef f():\n    from sds.xds import codec\n")
    assert imported_modules(sample) == {"asyncio", "sds"}


def test_floor_reads_requests_and_frames_responses_as_protobuf_does() -> None:
    floor = load_floor()
    request = discovery_pb2.DiscoveryRequest(
        version_info="v1",
        resource_names=["default", "ROOTCA"],
        type_url=floor.SECRET_TYPE_URL,
        response_nonce="n1",
    )
    request.node.id = "node-" + "x" * 200  # a two-byte length
    fields = floor.top_fields(request.SerializeToString())
    assert fields[3] == [b"default", b"ROOTCA"]
    assert fields[1] == [b"v1"]
    assert base_pb2.Node.FromString(fields[2][0]).id == request.node.id
    assert floor.top_fields(duration_pb2.Duration(seconds=300, nanos=7).SerializeToString()) == {
        1: [300],
        2: [7],
    }

    default = secret_pb2.Secret(name="default").SerializeToString()
    rootca = secret_pb2.Secret(name="ROOTCA" + "y" * 300).SerializeToString()
    servicer = floor.FloorServicer(
        [floor.any_secret(default)], {"ROOTCA": floor.any_secret(rootca)}
    )
    response = discovery_pb2.DiscoveryResponse.FromString(servicer._body([b"default", b"ROOTCA"]))
    assert (response.version_info, response.nonce) == ("v0", "n1")
    assert response.type_url == floor.SECRET_TYPE_URL
    assert [r.type_url for r in response.resources] == [floor.SECRET_TYPE_URL] * 2
    assert [r.value for r in response.resources] == [default, rootca]
