"""SPIFFE Workload API to Envoy SDS v3 bridge.

The public Python surface is small: the domain types, the error tree and the
Workload API client, the names in ``__all__``. The subpackages are the
implementation (mapped in ``docs/architecture.md``), importable but not a
stable API; everything else is reached through the ``sds`` command. Heavy
modules load on first use, so ``sds`` subcommands pay only for what they run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sds.errors import (
    ConfigError,
    InvalidBundle,
    InvalidJwt,
    InvalidMaterial,
    InvalidSpiffeId,
    InvalidSvid,
    NotEntitled,
    SdsError,
    SdsServerError,
    WorkloadApiDenied,
    WorkloadApiError,
    WorkloadApiMisconfigured,
    WorkloadApiUnavailable,
)
from sds.spiffe.id import SpiffeId, TrustDomain

if TYPE_CHECKING:
    from sds.spiffe.x509 import BundleSet, X509Bundle, X509Context, X509Source, X509Svid
    from sds.workloadapi.client import WorkloadApiClient
    from sds.workloadapi.watcher import Watcher

__all__ = [
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
]

# The one place the version is written: pyproject.toml reads it (dynamic version).
__version__ = "0.1.0"

_LAZY = {
    "BundleSet": "sds.spiffe.x509",
    "X509Bundle": "sds.spiffe.x509",
    "X509Context": "sds.spiffe.x509",
    "X509Source": "sds.spiffe.x509",
    "X509Svid": "sds.spiffe.x509",
    "Watcher": "sds.workloadapi.watcher",
    "WorkloadApiClient": "sds.workloadapi.client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sds' has no attribute {name!r}")
    import importlib  # noqa: PLC0415

    return getattr(importlib.import_module(module), name)
