"""Where a Workload API listens, and the header every call carries (SPIFFE Workload Endpoint).

* Section 4: the endpoint address is ``unix:///absolute/path`` or
  ``tcp://IP:PORT`` (an IP literal, never a host name), taken from
  ``SPIFFE_ENDPOINT_SOCKET`` when not configured: :func:`parse_address`.
* Section 3: every call carries ``workload.spiffe.io: true``
  (:data:`SECURITY_HEADER`, :data:`SECURITY_VALUE`); the client sends it, the
  embedded provider refuses calls without it.

Also the one reader of the ``unix:///path`` socket options of the other
commands (the bridge's ``listen``, ``envoy-bootstrap --sds-socket``,
``inspect --sds``): :func:`unix_socket_path`. Standard library only, so the
bridge config can check addresses without loading gRPC.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from sds.errors import ConfigError

__all__ = [
    "ENDPOINT_ENV",
    "MAX_UNIX_PATH_BYTES",
    "SECURITY_HEADER",
    "SECURITY_VALUE",
    "Address",
    "as_address",
    "parse_address",
    "unix_socket_path",
]

#: Environment variable naming the Workload API endpoint (Workload Endpoint s.4).
ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"
#: The security header's name and value, sent on every call (Workload Endpoint s.3).
SECURITY_HEADER = "workload.spiffe.io"
SECURITY_VALUE = "true"
#: The longest Unix socket path the kernel binds (``sun_path`` is 108 bytes with its NUL).
MAX_UNIX_PATH_BYTES = 107


@dataclass(frozen=True, slots=True)
class Address:
    """A Workload API endpoint: a Unix socket path or a TCP ``IP:port`` (Workload Endpoint s.4).

    ``str(address)`` is the canonical URI (``unix:///path`` or ``tcp://ip:port``).
    """

    scheme: Literal["unix", "tcp"]
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.scheme == "unix":
            return "unix://" + self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_address(text: str | None, *, option: str = "--workload-api") -> Address:
    """Parse a Workload API address; ``None`` or ``""`` means ``$SPIFFE_ENDPOINT_SOCKET``.

    Accepts ``unix:///abs/path``, ``unix:/abs/path`` and ``tcp://IP:PORT`` with an
    IP literal (SPIFFE Workload Endpoint s.4). Raises ConfigError with one line
    naming the address (and its source) and what is wrong; ``option`` is the
    command-line flag named when no address is configured at all.
    """
    source = ""
    if not text:
        text = os.environ.get(ENDPOINT_ENV, "")
        source = f" (from {ENDPOINT_ENV})"
        if not text:
            raise ConfigError(f"no workload API address: set {ENDPOINT_ENV} or pass {option}")

    def bad(reason: str) -> ConfigError:
        return ConfigError(f"workload API address {text!r}{source} {reason}")

    generic = "must be unix:///path or tcp://ip:port"
    if "\x00" in text:
        raise bad("contains a NUL byte")
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise bad(generic) from exc
    if parts.scheme == "unix":
        if parts.netloc:
            raise bad("must not name a host; use unix:///absolute/path")
        if parts.query or parts.fragment or "?" in text or "#" in text:
            raise bad("must not have a query or fragment")
        if not parts.path.startswith("/"):
            raise bad("must have an absolute socket path (unix:///absolute/path)")
        return Address("unix", path=parts.path)
    if parts.scheme == "tcp":
        if parts.path or parts.query or parts.fragment or "?" in text or "#" in text:
            raise bad("must not have a path, query or fragment")
        if parts.username is not None or parts.password is not None:
            raise bad("must not have user info")
        try:
            port = parts.port
        except ValueError as exc:
            raise bad("has an invalid port") from exc
        host = parts.hostname
        if not host:
            raise bad(generic)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError as exc:
            raise bad(f"must use an IP address, not the host name {host!r}") from exc
        if not port:
            raise bad("must include a port (tcp://ip:port)")
        return Address("tcp", host=str(ip), port=port)
    raise bad(generic)


def as_address(address: Address | str | None) -> Address:
    """``address`` itself, or parsed by :func:`parse_address`."""
    return address if isinstance(address, Address) else parse_address(address)


def unix_socket_path(text: str, *, bare: bool = False) -> str:
    """The path of ``unix:///abs/path`` (with ``bare``, a plain ``/abs/path`` is accepted too).

    Raises ValueError whose message follows the quoted input: ``want unix:///path``,
    ``must be an absolute path`` or ``longer than 107 bytes``.
    """
    if text.startswith("unix://"):
        path = text[len("unix://") :]
    elif bare:
        path = text
    else:
        raise ValueError("want unix:///path")
    if not path.startswith("/"):
        raise ValueError("must be an absolute path")
    if len(path.encode()) > MAX_UNIX_PATH_BYTES:
        raise ValueError(f"longer than {MAX_UNIX_PATH_BYTES} bytes")
    return path
