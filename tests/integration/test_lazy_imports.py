"""``sds run`` loads only what its configured features need (issue 13: the idle sidecar).

Each check runs a fresh interpreter, imports everything ``sds run`` imports before
serving, and reads ``sys.modules``: memory facts, no timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# What `sds run` imports at start: the CLI, the command module, the composition root and
# every module it imports before it reads the configuration's optional features.
RUN_IMPORTS = (
    "sds.cli",
    "sds.bridge.app",
    "sds.bridge.root",
    "sds.bridge.views",
    "sds._util.log",
    "sds._util.peercred",
    "sds.workloadapi.client",
    "sds.workloadapi.watcher",
    "sds.errors",
    "sds.bridge.admin",
    "sds.bridge.state",
    "sds.bridge.config",
    "sds.bridge.jwtsvids",
    "sds.xds.service",
)

# Loaded only on demand: /metrics (admin or metrics listener), a --config file,
# JWT-SVID claims, Envoy's generated message classes (never on the serving path).
LAZY = ("prometheus_client", "http.server", "yaml", "google.protobuf.json_format", "grpc")


def loaded_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nimport json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
    )
    return set(json.loads(out.stdout))


def test_sds_run_imports_leave_the_optional_modules_unloaded() -> None:
    modules = loaded_after("\n".join(f"import {m}" for m in RUN_IMPORTS))
    assert "sds.xds.service" in modules
    assert [m for m in LAZY if m in modules] == []
    assert "sds.bridge.metrics" not in modules
    assert not any(m.startswith("envoy_data_plane") for m in modules)
    assert not any(m.startswith("sds.provider") for m in modules)  # it loads PyYAML


def test_the_run_command_line_loads_no_other_subcommand() -> None:
    modules = loaded_after(
        "from sds.cli import build_parser\n"
        "args = build_parser('run').parse_args(['run', '--listen', 'unix:///tmp/x.sock'])\n"
        "assert args.listen == 'unix:///tmp/x.sock'\n"
    )
    assert "sds.bridge.app" in modules
    others = (
        "sds.provider",
        "sds.tools.demo",
        "sds.tools.bootstrap",
        "sds.tools.inspect",
        "yaml",
        "zipfile",
    )
    assert [m for m in others if m in modules] == []


def test_reading_a_config_file_loads_yaml_and_still_parses_strictly() -> None:
    modules = loaded_after(
        "from sds.bridge.config import parse_config_text\n"
        "from sds.errors import ConfigError\n"
        "try:\n"
        "    parse_config_text(b'listen: unix:///a\\nlisten: unix:///b\\n', 'x.yaml')\n"
        "except ConfigError as exc:\n"
        "    assert str(exc) == 'x.yaml: line 2: invalid YAML: duplicate key \\'listen\\'', exc\n"
        "else:\n"
        "    raise AssertionError('duplicate key accepted')\n"
    )
    assert "yaml" in modules


def test_metrics_module_brings_prometheus_client() -> None:
    # The other side of the first test: the lazy import is what keeps it out.
    assert "prometheus_client" in loaded_after("import sds.bridge.metrics")
