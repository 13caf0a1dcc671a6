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

from sds.xds.codec import encode_field, iter_fields

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


def test_floor_wire_helpers_agree_with_the_bridge_codec() -> None:
    floor = load_floor()
    message = (
        encode_field(1, b"v1")
        + encode_field(2, encode_field(1, b"node") + bytes([0x18, 0x96, 0x01]))
        + encode_field(3, b"default")
        + encode_field(3, b"ROOTCA")
        + bytes([0x30, 0xAC, 0x02])  # field 6, varint 300
        + encode_field(4, b"x" * 300)  # a two-byte length
    )
    expected: dict[int, list[bytes | int]] = {}
    for number, value in iter_fields(message):
        expected.setdefault(number, []).append(value)
    assert floor.top_fields(message) == expected
    assert floor.field_bytes(4, b"x" * 300) == encode_field(4, b"x" * 300)
    assert floor.field_bytes(2, b"") == encode_field(2, b"")
