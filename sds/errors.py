"""Every error this package raises on purpose, in one tree.

Third-party errors (cryptography, grpclib, PyYAML, OS errors) are translated
at the boundary where they occur, with ``raise ... from``, so callers catch
these classes only. gRPC status codes are chosen in the servicers alone; this
module knows nothing of gRPC.

::

    SdsError
    ├── ConfigError                   a config or identities file is wrong (CLI exit 2)
    │   ├── UnsafePath                a directory or file others could read or swap (exit 2)
    │   ├── SocketInUse               another live server already answers on that socket (exit 2)
    │   └── StartupError              cannot start as configured: no directory, address in use
    ├── InvalidSpiffeId               not a valid SPIFFE ID or trust domain (also ValueError)
    ├── InvalidMaterial               certificates, keys, bundles or tokens that fail checks
    │   ├── InvalidSvid               an X.509-SVID that must not be published
    │   ├── InvalidBundle             a trust bundle (X.509 or JWKS) that cannot be used
    │   └── InvalidJwt                a JWT-SVID that fails parsing, signature, aud or exp
    ├── NotEntitled                   an attested caller matches no identity
    │   └── ProcessExited             the process a pid named is gone (its pid may be reused)
    ├── WorkloadApiError              talking to a Workload API failed
    │   ├── WorkloadApiUnavailable    socket missing, refused or the server went away (retry)
    │   ├── WorkloadApiDenied         the server refused this caller (retry: it may change)
    │   └── WorkloadApiMisconfigured  INVALID_ARGUMENT: fix configuration, do not retry
    └── SdsServerError                the SDS side cannot start or serve
        └── TooManyCallers            per-caller mode is attesting as many processes as allowed
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "InvalidBundle",
    "InvalidJwt",
    "InvalidMaterial",
    "InvalidSpiffeId",
    "InvalidSvid",
    "NotEntitled",
    "ProcessExited",
    "SdsError",
    "SdsServerError",
    "SocketInUse",
    "StartupError",
    "TooManyCallers",
    "UnsafePath",
    "WorkloadApiDenied",
    "WorkloadApiError",
    "WorkloadApiMisconfigured",
    "WorkloadApiUnavailable",
]


class SdsError(Exception):
    """Base class of every error raised on purpose by this package."""


class ConfigError(SdsError):
    """A configuration or identities file is invalid; the message names the file and field."""


class UnsafePath(ConfigError):
    """A state or socket directory (or a file in it) that another local user could read or swap."""


class SocketInUse(ConfigError):
    """A live server already accepts connections on the socket path we were asked to bind."""


class StartupError(ConfigError):
    """The process cannot start as configured (directory cannot be created, address in use)."""


class InvalidSpiffeId(SdsError, ValueError):
    """A string is not a SPIFFE ID or trust domain (SPIFFE-ID standard, section 2)."""


class InvalidMaterial(SdsError):
    """Cryptographic material failed parsing or validation."""


class InvalidSvid(InvalidMaterial):
    """An X.509-SVID fails the X509-SVID standard or does not chain to its bundle."""


class InvalidBundle(InvalidMaterial):
    """A trust bundle cannot be parsed or is unusable."""


class InvalidJwt(InvalidMaterial):
    """A JWT-SVID fails parsing, signature, audience or expiry checks."""


class NotEntitled(SdsError):
    """The attested caller matches no identity rule."""


class ProcessExited(NotEntitled):
    """The process a pid named has exited, so nothing may be served on its behalf."""


class WorkloadApiError(SdsError):
    """A Workload API call failed."""


class WorkloadApiUnavailable(WorkloadApiError):
    """The Workload API cannot be reached now; retrying may succeed."""


class WorkloadApiDenied(WorkloadApiError):
    """The Workload API refused this caller (PERMISSION_DENIED); retried with backoff."""


class WorkloadApiMisconfigured(WorkloadApiError):
    """The Workload API rejected the request as malformed (INVALID_ARGUMENT); not retried hot."""


class SdsServerError(SdsError):
    """The SDS server cannot start or serve (socket, permissions, address)."""


class TooManyCallers(SdsServerError):
    """Per-caller mode holds ``per_caller.max_callers`` caller processes already; a new one
    is refused until one ends (each costs an upstream subscription)."""
