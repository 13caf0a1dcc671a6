"""Regenerate ``sds/_proto`` from ``proto/*.proto``; ``--check`` fails if it is stale.

Usage (from the repository root, with the dev extra installed)::

    python proto/generate.py          # rewrite the modules in GENERATED
    python proto/generate.py --check  # exit 1 if the committed code differs

Code is produced by grpcio-tools' bundled ``protoc`` (``--python_out`` and
``--pyi_out``) and grpclib's plugin (``--grpclib_python_out``: the Workload
API and SPIRE's Delegated Identity API only; the SDS service is served by
``sds.xds.service`` with request messages from ``discovery_lite.proto``).
The grpclib stubs' absolute ``import workload_pb2`` and ``import
delegatedidentity_pb2`` are rewritten to relative imports; nothing else is
edited.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "sds" / "_proto"
GENERATED = (
    "workload_pb2.py",
    "workload_pb2.pyi",
    "workload_grpc.py",
    "discovery_lite_pb2.py",
    "discovery_lite_pb2.pyi",
    "delegatedidentity_pb2.py",
    "delegatedidentity_pb2.pyi",
    "delegatedidentity_grpc.py",
)


def generate(dest: Path) -> None:
    """Write the generated modules for ``workload.proto`` and ``discovery_lite.proto``."""
    import grpc_tools  # noqa: PLC0415 - dev-only dependency

    include = Path(grpc_tools.__file__).parent / "_proto"
    env = dict(os.environ)
    scripts = sysconfig.get_path("scripts")
    env["PATH"] = scripts + os.pathsep + env.get("PATH", "")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={dest}",
            f"--pyi_out={dest}",
            f"--grpclib_python_out={dest}",
            "workload.proto",
            "delegatedidentity.proto",
        ],
        check=True,
        env=env,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={dest}",
            f"--pyi_out={dest}",
            "discovery_lite.proto",
        ],
        check=True,
        env=env,
    )
    for name in ("workload", "delegatedidentity"):
        stub = dest / f"{name}_grpc.py"
        text = stub.read_text()
        text = text.replace(f"\nimport {name}_pb2\n", f"\nfrom . import {name}_pb2\n")
        stub.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        if args.check:
            stale = [
                name
                for name in GENERATED
                if not (OUT_DIR / name).exists()
                or not filecmp.cmp(Path(tmp) / name, OUT_DIR / name, shallow=False)
            ]
            if stale:
                print(f"stale generated code: {', '.join(stale)}; run python proto/generate.py")
                return 1
            return 0
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            shutil.copyfile(Path(tmp) / name, OUT_DIR / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
