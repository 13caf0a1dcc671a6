"""The tree matches docs/architecture.md: imports go only down the layers; the surface is small.

The layer table is read from the document itself, so the rule and its
description cannot drift apart. Every import counts, including the lazy ones
inside functions, since a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

import sds

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"

__all__ = ["layer_table", "proto_violations", "violations"]


def layer_table(doc: str) -> dict[str, int]:
    """Package name -> layer, from the ``layer N: pkg pkg`` lines under the ``layers`` marker."""
    marker = doc.index("<!-- layers")
    block = re.search(r"```text\n(.*?)```", doc[marker:], re.S)
    assert block is not None, "no ```text block after the layers marker"
    layers: dict[str, int] = {}
    for line in block.group(1).splitlines():
        match = re.fullmatch(r"layer (\d+): (.+)", line.strip())
        assert match is not None, f"unparsable layer line: {line!r}"
        for package in match.group(2).split():
            layers[package] = int(match.group(1))
    return layers


def _unit(module: str) -> str:
    """The layer unit a module belongs to: ``sds.bridge.app`` -> ``sds.bridge``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _imports(path: Path, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every import of ``sds`` in one source file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, target] if target else base)
            found.append((node.lineno, target, [alias.name for alias in node.names]))
    return [(line, target, names) for line, target, names in found if _unit(target)[:3] == "sds"]


def violations(root: Path, layers: dict[str, int]) -> list[str]:
    """One line per import under ``root/sds`` that goes sideways or up the layers."""
    problems = []
    for path in sorted((root / "sds").rglob("*.py")):
        rel = path.relative_to(root)
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        unit = _unit(module)
        if unit in {"sds", "sds._proto"}:
            continue  # the public root re-exports from everywhere; generated code imports nothing
        if unit not in layers:
            problems.append(f"{rel}: {unit} is not in the layer table of docs/architecture.md")
            continue
        for line, target, names in _imports(path, module):
            other = _unit(target)
            if other == unit:
                continue
            if other == "sds":
                if target == "sds" and names == ["__version__"]:
                    continue
                problems.append(f"{rel}:{line} imports the public root sds; import the module")
                continue
            if other not in layers:
                problems.append(f"{rel}:{line} imports {target}, which is in no layer")
            elif layers[other] >= layers[unit]:
                problems.append(
                    f"{rel}:{line} imports {target}: layer {layers[unit]} ({unit}) may not "
                    f"import layer {layers[other]} ({other})"
                )
    return problems


def test_imports_only_go_down_the_layers() -> None:
    assert violations(REPO, layer_table(DOC.read_text())) == []


def test_every_package_in_the_tree_has_a_layer_and_every_layer_a_package() -> None:
    layers = layer_table(DOC.read_text())
    tree = {
        f"sds.{p.stem}"
        for p in (REPO / "sds").iterdir()
        if (p.is_dir() and (p / "__init__.py").exists())
        or (p.suffix == ".py" and p.name != "__init__.py")
    }
    assert tree == set(layers)


def test_the_check_catches_an_upward_a_sideways_and_a_lazy_import(tmp_path: Path) -> None:
    (tmp_path / "sds" / "spiffe").mkdir(parents=True)
    (tmp_path / "sds" / "xds").mkdir()
    (tmp_path / "sds" / "spiffe" / "id.py").write_text("from sds.bridge.config import X\n")
    (tmp_path / "sds" / "xds" / "codec.py").write_text(
        textwrap.dedent("""\
            import sds.errors
            from sds.xds import cache


            def f():
                from sds.workloadapi.client import parse_address
                from sds import SpiffeId
                from sds import __version__
            """)
    )
    layers = layer_table(DOC.read_text())
    assert violations(tmp_path, layers) == [
        "sds/spiffe/id.py:1 imports sds.bridge.config: layer 2 (sds.spiffe) may not "
        "import layer 4 (sds.bridge)",
        "sds/xds/codec.py:6 imports sds.workloadapi.client: layer 3 (sds.xds) may not "
        "import layer 3 (sds.workloadapi)",
        "sds/xds/codec.py:7 imports the public root sds; import the module",
    ]


def test_a_relative_import_is_resolved_before_it_is_judged(tmp_path: Path) -> None:
    (tmp_path / "sds" / "_util").mkdir(parents=True)
    (tmp_path / "sds" / "_util" / "log.py").write_text("from ..spiffe import id\n")
    assert violations(tmp_path, layer_table(DOC.read_text())) == [
        "sds/_util/log.py:1 imports sds.spiffe: layer 1 (sds._util) may not import layer 2 "
        "(sds.spiffe)"
    ]


# Generated protobuf module -> the modules that may import it: only the edges read the wire.
PROTO_READERS: dict[str, set[str]] = {
    "sds._proto.workload_pb2": {"sds.workloadapi.client", "sds.provider.service"},
    "sds._proto.workload_grpc": {"sds.workloadapi.client", "sds.provider.service"},
    "sds._proto.discovery_lite_pb2": {"sds.xds.codec"},
    "sds._proto.delegatedidentity_pb2": {"sds.workloadapi.delegated", "sds.provider.delegated"},
    "sds._proto.delegatedidentity_grpc": {"sds.workloadapi.delegated", "sds.provider.delegated"},
}


def proto_violations(root: Path) -> list[str]:
    """One line per import of generated code (``sds._proto.*``) outside its listed readers."""
    problems = []
    for path in sorted((root / "sds").rglob("*.py")):
        rel = path.relative_to(root)
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        if _unit(module) == "sds._proto":
            continue
        for line, target, names in _imports(path, module):
            if target == "sds._proto":  # from sds._proto import workload_pb2
                targets = [f"sds._proto.{name}" for name in names]
            elif target.startswith("sds._proto."):
                targets = [target]
            else:
                continue
            for proto in targets:
                if module not in PROTO_READERS.get(proto, set()):
                    problems.append(f"{rel}:{line} imports {proto}, which only its edges may read")
    return problems


def test_generated_protobuf_is_read_only_by_its_edge_modules() -> None:
    assert proto_violations(REPO) == []


def test_the_protobuf_check_catches_a_reader_that_is_not_an_edge(tmp_path: Path) -> None:
    (tmp_path / "sds" / "bridge").mkdir(parents=True)
    (tmp_path / "sds" / "workloadapi").mkdir()
    (tmp_path / "sds" / "bridge" / "state.py").write_text(
        "from sds._proto import delegatedidentity_pb2\n"
        "from sds._proto.workload_grpc import SpiffeWorkloadAPIStub\n"
    )
    (tmp_path / "sds" / "workloadapi" / "delegated.py").write_text(
        "from sds._proto import delegatedidentity_pb2 as pb\n"
        "from sds._proto.delegatedidentity_grpc import DelegatedIdentityStub\n"
    )
    assert proto_violations(tmp_path) == [
        "sds/bridge/state.py:1 imports sds._proto.delegatedidentity_pb2, which only its edges "
        "may read",
        "sds/bridge/state.py:2 imports sds._proto.workload_grpc, which only its edges may read",
    ]


PUBLIC = {
    "BundleSet",
    "ConfigError",
    "InvalidBundle",
    "InvalidJwt",
    "InvalidMaterial",
    "InvalidSpiffeId",
    "InvalidSvid",
    "NotEntitled",
    "SdsError",
    "SdsServerError",
    "SpiffeId",
    "TrustDomain",
    "Watcher",
    "WorkloadApiClient",
    "WorkloadApiDenied",
    "WorkloadApiError",
    "WorkloadApiMisconfigured",
    "WorkloadApiUnavailable",
    "X509Bundle",
    "X509Context",
    "X509Source",
    "X509Svid",
    "__version__",
}


def test_the_public_surface_is_exactly_the_listed_names() -> None:
    assert set(sds.__all__) == PUBLIC
    for name in sds.__all__:
        assert getattr(sds, name) is not None
    with pytest.raises(AttributeError, match="module 'sds' has no attribute 'Bridge'"):
        _ = sds.Bridge
