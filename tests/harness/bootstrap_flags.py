"""``sds envoy-bootstrap`` flags for the bootstrap tests, what they generate, and the examples.

The unit tests read the generated bootstrap; the e2e tests give the same
bootstraps (and the committed ``envoy/*.yaml`` examples) to a real Envoy.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from sds.tools import bootstrap as _bootstrap
from sds.tools.bootstrap import BootstrapOptions

REPO = Path(__file__).resolve().parents[2]


EXAMPLES = REPO / "envoy"


TD = "spiffe://example.org"


WEB, CLIENT_A, CLIENT_B = f"{TD}/web", f"{TD}/client-a", f"{TD}/client-b"


BASE = ["--node-id", "node-1", "--sds-socket", "/run/sds/sds.sock"]


INBOUND = ["--inbound", "8443:127.0.0.1:8080", "--allow", CLIENT_A, "--allow", f"{TD}/ns/prod/*"]


OUTBOUND = ["--outbound", "127.0.0.1:9001=server.example:8443", "--expect", WEB]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    _bootstrap.add_arguments(parser)
    return parser.parse_args(list(argv))


def generate(*argv: str) -> tuple[BootstrapOptions, dict[str, Any]]:
    """Options and the bootstrap as Envoy reads it: rendered to YAML text and parsed back."""
    options = _bootstrap.options_from_args(parse(*argv))
    return options, yaml.safe_load(_bootstrap.render_bootstrap(options))


def example_files() -> list[Path]:
    """The committed example bootstraps and bridge snippets, ``envoy/*.yaml``."""
    return sorted(EXAMPLES.glob("*.yaml"))


def is_snippet(path: Path) -> bool:
    """Whether ``path`` is a bridge policy snippet rather than an Envoy bootstrap."""
    return path.read_text().startswith(_bootstrap.SNIPPET_MARKER)
