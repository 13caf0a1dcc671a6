"""TLS clients for tests: openssl and curl as independent real peers, Python ssl as the fast path.

Servers in this project present X.509-SVIDs whose only SAN is a SPIFFE URI
(X509-SVID standard, section 4), so no client here checks a hostname: the
openssl and Python clients verify the chain against the given CA bundle and
report the peer's leaf for the test to check the identity itself. curl has no
switch to verify the chain without the hostname, so :func:`curl_get` runs with
``-k`` and returns the presented chain instead; pair it with
:func:`openssl_handshake` when the chain must be verified by a real peer.

PEM inputs are written to a fresh private temporary directory (key files
0600) for the duration of one call and removed afterwards.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

__all__ = [
    "CurlResult",
    "Handshake",
    "HttpsClient",
    "HttpsResponse",
    "curl_get",
    "http_request",
    "https_get",
    "openssl_handshake",
    "uri_sans",
]

_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def http_request(path: str = "/", host: str = "localhost") -> bytes:
    """A minimal HTTP/1.1 GET that asks the server to close the connection after answering."""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The URI SANs of ``cert`` (an SVID has exactly one: its SPIFFE ID)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _certs_in(text: bytes) -> tuple[x509.Certificate, ...]:
    return tuple(x509.load_pem_x509_certificate(block) for block in _PEM_RE.findall(text))


@contextlib.contextmanager
def _pem_files(**pems: bytes | None) -> Iterator[tuple[Path, dict[str, Path]]]:
    """Write each non-None PEM to a private temp dir (0700, files 0600); remove it afterwards.

    Yields the directory (free for other scratch files) and name -> path.
    """
    tmp = Path(tempfile.mkdtemp(prefix="tls-"))
    try:
        paths: dict[str, Path] = {}
        for name, data in pems.items():
            if data is None:
                continue
            path = tmp / f"{name}.pem"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            paths[name] = path
        yield tmp, paths
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _PeerMixin:
    chain: tuple[x509.Certificate, ...]

    @property
    def leaf(self) -> x509.Certificate | None:
        """The server's end-entity certificate, or None if it presented none."""
        return self.chain[0] if self.chain else None

    @property
    def serial(self) -> int | None:
        """The server leaf's serial number."""
        return None if self.leaf is None else self.leaf.serial_number

    @property
    def spiffe_id(self) -> str | None:
        """The server leaf's single URI SAN, or None if it has not exactly one."""
        uris = [] if self.leaf is None else uri_sans(self.leaf)
        return uris[0] if len(uris) == 1 else None


# --------------------------------------------------------------------------- openssl


@dataclass(frozen=True)
class Handshake(_PeerMixin):
    """What ``openssl s_client`` saw: success, verification, the server chain and any reply."""

    ok: bool
    """The handshake completed, the chain verified, and (if a request was sent) a reply came."""
    verified: bool
    """openssl printed ``Verify return code: 0 (ok)`` for the server chain."""
    protocol: str | None
    chain: tuple[x509.Certificate, ...]
    alert: str | None
    """The TLS alert that ended the connection, e.g. ``certificate required``, if any."""
    http_status: int | None
    output: str = field(repr=False)
    returncode: int = 0


def openssl_handshake(
    host: str,
    port: int,
    cert_pem: bytes | None,
    key_pem: bytes | None,
    ca_pem: bytes,
    *,
    timeout: float = 10.0,
    request: bytes | None = None,
    send_request: bool = True,
    extra_args: tuple[str, ...] = (),
) -> Handshake:
    """Handshake with ``openssl s_client -showcerts -verify_return_error``; never raises on failure.

    The client presents ``cert_pem``/``key_pem`` when given and verifies the
    server chain against ``ca_pem`` (no hostname check). In TLS 1.3 a server
    rejects a client certificate only after the client considers the
    handshake done, so by default an HTTP/1.1 GET (``request``, default
    :func:`http_request`) is sent and the reply awaited: ``ok`` then means the
    server accepted us and answered. ``send_request=False`` only handshakes
    and closes: it proves the server's side (chain, serial) but may miss a
    rejection of the client certificate, depending on timing.
    """
    if request is None:
        request = http_request()
    with _pem_files(cert=cert_pem, key=key_pem, ca=ca_pem) as (_, files):
        argv = [
            "openssl",
            "s_client",
            "-connect",
            f"{host}:{port}",
            "-CAfile",
            str(files["ca"]),
            "-showcerts",
            "-verify_return_error",
        ]
        if "cert" in files:
            argv += ["-cert", str(files["cert"])]
        if "key" in files:
            argv += ["-key", str(files["key"])]
        if send_request:
            # Keep reading after stdin ends, until the server closes the connection.
            argv.append("-ign_eof")
        argv += list(extra_args)
        try:
            result = subprocess.run(
                argv,
                input=request if send_request else b"",
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"") + (exc.stderr or b"")
            return Handshake(
                ok=False,
                verified=False,
                protocol=None,
                chain=_certs_in(out),
                alert=None,
                http_status=None,
                output=f"timed out after {timeout}s\n" + out.decode(errors="replace"),
                returncode=-1,
            )
    stdout = result.stdout.decode(errors="replace")
    output = stdout + result.stderr.decode(errors="replace")
    verify = re.search(r"Verify return code: (\d+)", stdout)
    verified = verify is not None and verify.group(1) == "0"
    protocol = re.search(r"^\s*Protocol\s*:\s*(\S+)", stdout, re.MULTILINE)
    if protocol is None:
        protocol = re.search(r"New, (TLSv[\d.]+), Cipher", stdout)
    alert = re.search(r"alert ([a-z ]+?)(?::|\n|$)", output, re.MULTILINE)
    # Not anchored: s_client may interleave session-ticket dumps with the reply.
    status = re.search(r"HTTP/1\.[01] (\d{3}) ", stdout)
    http_status = int(status.group(1)) if status else None
    handshake_done = "CONNECTED" in stdout and "Cipher is (NONE)" not in stdout
    ok = (
        result.returncode == 0
        and handshake_done
        and verified
        and alert is None
        and (not send_request or http_status is not None)
    )
    return Handshake(
        ok=ok,
        verified=verified,
        protocol=protocol.group(1) if protocol else None,
        chain=_certs_in(result.stdout),
        alert=alert.group(1).strip() if alert else None,
        http_status=http_status,
        output=output,
        returncode=result.returncode,
    )


# --------------------------------------------------------------------------- curl


@dataclass(frozen=True)
class CurlResult(_PeerMixin):
    """What curl got: its exit code, the HTTP status and body, and the server's chain."""

    returncode: int
    status: int | None
    body: bytes
    headers: dict[str, str]
    chain: tuple[x509.Certificate, ...]
    output: str = field(repr=False)

    @property
    def ok(self) -> bool:
        """curl exited 0 (TLS and HTTP exchange completed)."""
        return self.returncode == 0

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


def curl_get(
    host: str,
    port: int,
    cert_pem: bytes | None,
    key_pem: bytes | None,
    ca_pem: bytes | None = None,
    *,
    path: str = "/",
    timeout: float = 10.0,
    headers: Mapping[str, str] | None = None,
) -> CurlResult:
    """GET ``https://host:port/path`` with curl presenting ``cert_pem``; never raises on failure.

    curl runs with ``-k``: SPIFFE server certificates have no DNS/IP SAN and
    curl cannot verify a chain while skipping the hostname, so ``ca_pem`` is
    passed as ``--cacert`` for completeness only. The chain the server
    presented is returned (``%{certs}``) for the test to check.
    """
    with _pem_files(cert=cert_pem, key=key_pem, ca=ca_pem) as (tmp, files):
        body_path = tmp / "body"
        head_path = tmp / "headers"
        argv = [
            "curl",
            "--silent",
            "--show-error",
            "--insecure",
            "--http1.1",
            "--max-time",
            str(timeout),
            "--output",
            str(body_path),
            "--dump-header",
            str(head_path),
            "--write-out",
            "%{http_code}\n%{certs}",
        ]
        if "ca" in files:
            argv += ["--cacert", str(files["ca"])]
        if "cert" in files:
            argv += ["--cert", str(files["cert"])]
        if "key" in files:
            argv += ["--key", str(files["key"])]
        for name, value in (headers or {}).items():
            argv += ["--header", f"{name}: {value}"]
        argv.append(f"https://{host}:{port}{path}")
        result = subprocess.run(argv, capture_output=True, timeout=timeout + 5, check=False)
        body = body_path.read_bytes() if body_path.exists() else b""
        head = head_path.read_text(errors="replace") if head_path.exists() else ""
    code_line, _, certs = result.stdout.partition(b"\n")
    status = int(code_line) if code_line.strip().isdigit() and int(code_line) else None
    parsed_headers: dict[str, str] = {}
    for line in head.splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep:
            parsed_headers[name.strip().lower()] = value.strip()
    return CurlResult(
        returncode=result.returncode,
        status=status,
        body=body,
        headers=parsed_headers,
        chain=_certs_in(certs),
        output=result.stderr.decode(errors="replace"),
    )


# --------------------------------------------------------------------------- Python ssl


@dataclass(frozen=True)
class HttpsResponse:
    """One HTTP response over verified TLS, with the server's leaf certificate."""

    status: int
    body: bytes
    headers: dict[str, str]
    peer_leaf: x509.Certificate
    protocol: str | None

    @property
    def serial(self) -> int:
        """The server leaf's serial number."""
        return self.peer_leaf.serial_number

    @property
    def spiffe_id(self) -> str | None:
        """The server leaf's single URI SAN, or None if it has not exactly one."""
        uris = uri_sans(self.peer_leaf)
        return uris[0] if len(uris) == 1 else None

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


class HttpsClient:
    """A reusable verifying client: chain checked against ``ca_pem``, hostname not checked.

    Build once and call :meth:`get` in a loop; each call opens a new
    connection (so a full handshake, which shows certificate rotation).
    """

    def __init__(
        self, ca_pem: bytes, cert_pem: bytes | None = None, key_pem: bytes | None = None
    ) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=ca_pem.decode("ascii"))
        if cert_pem is not None:
            with _pem_files(cert=cert_pem, key=key_pem) as (_, files):
                context.load_cert_chain(files["cert"], files.get("key"))
        self.context = context

    def get(
        self,
        host: str,
        port: int,
        path: str = "/",
        *,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> HttpsResponse:
        """GET ``path``; raise ssl.SSLError or OSError when TLS or the exchange fails.

        A TLS 1.3 server that rejects our certificate does so after the
        handshake: the failure then surfaces on reading the response, as
        ssl.SSLError (the alert), ssl.SSLEOFError or ConnectionResetError.
        """
        conn = http.client.HTTPSConnection(host, port, context=self.context, timeout=timeout)
        try:
            conn.request("GET", path, headers=dict(headers or {}))
            response = conn.getresponse()
            body = response.read()
            sock = conn.sock
            assert isinstance(sock, ssl.SSLSocket)
            der = sock.getpeercert(binary_form=True)
            assert der is not None
            return HttpsResponse(
                status=response.status,
                body=body,
                headers={k.lower(): v for k, v in response.getheaders()},
                peer_leaf=x509.load_der_x509_certificate(der),
                protocol=sock.version(),
            )
        finally:
            conn.close()


def https_get(
    host: str,
    port: int,
    cert_pem: bytes | None,
    key_pem: bytes | None,
    ca_pem: bytes,
    *,
    path: str = "/",
    timeout: float = 5.0,
    headers: Mapping[str, str] | None = None,
) -> HttpsResponse:
    """One verifying GET with Python ssl (see :class:`HttpsClient`); raises ssl.SSLError/OSError."""
    return HttpsClient(ca_pem, cert_pem, key_pem).get(
        host, port, path, timeout=timeout, headers=headers
    )
