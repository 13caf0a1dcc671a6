"""``sds inspect`` against the strict fake Workload API (in-process) and the real provider."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from sds import cli
from tests.harness.fake_workload_api import FakeWorkloadApi, JwtIssuer, x509_response
from tests.harness.material import Authority


@pytest.fixture(autouse=True)
def _restore_sds_logging(restore_sds_logging: None) -> None:
    """cli.main() configures the ``sds`` logger for the process; undo it after each test."""


@pytest.fixture
async def fake(sockdir: Path) -> FakeWorkloadApi:
    api = FakeWorkloadApi()
    await api.start_unix(sockdir / "api.sock")
    yield api  # type: ignore[misc]
    await api.stop()
    assert api.violations == []


async def inspect(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``sds inspect ARGS`` in a thread (the fake serves on this loop)."""
    code = await asyncio.to_thread(cli.main, ["inspect", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _iso(svid_time: object) -> str:
    return svid_time.strftime("%Y-%m-%dT%H:%M:%SZ")  # type: ignore[attr-defined]


@pytest.fixture
def world(fake: FakeWorkloadApi) -> dict[str, object]:
    ca, other = Authority("example.org"), Authority("other.org")
    web = ca.svid("/web", hint="web", dns=["web.example.org", "web"], ips=["10.0.0.7"])
    db = ca.svid("/db")
    fake.set_x509(x509_response([web, db], [ca.bundle], [other.bundle]))
    fake.x509_bundles = {
        ca.trust_domain.id: ca.bundle.der(),
        other.trust_domain.id: other.bundle.der(),
    }
    issuer = JwtIssuer(ca.trust_domain, [(web.spiffe_id, "web")])
    fake.jwt_issuer = issuer
    fake.set_jwt_bundles([issuer.bundle])
    return {"web": web, "db": db, "issuer": issuer}


async def test_inspect_prints_svids_bundles_and_jwt(
    fake: FakeWorkloadApi, world: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    web, db = world["web"], world["db"]
    code, out, err = await inspect(
        capsys, "--path", fake.address, "--audience", "payments", "--show-token"
    )
    assert (code, err) == (0, "")
    token_line = next(line for line in out.splitlines() if "token:" in line)
    token = token_line.split("token:")[1].strip()
    expiry_line = next(line for line in out.splitlines() if "expiry:" in line)
    assert out == (
        f"Workload API: {fake.address}\n"
        "X.509-SVIDs: 2\n"
        "  spiffe://example.org/web\n"
        "    hint:      web\n"
        f"    serial:    {web.serial:x}\n"  # type: ignore[attr-defined]
        f"    not after: {_iso(web.not_after)}\n"  # type: ignore[attr-defined]
        "    DNS SANs:  web.example.org, web\n"
        "    IP SANs:   10.0.0.7\n"
        "  spiffe://example.org/db\n"
        "    hint:      (none)\n"
        f"    serial:    {db.serial:x}\n"  # type: ignore[attr-defined]
        f"    not after: {_iso(db.not_after)}\n"  # type: ignore[attr-defined]
        "    DNS SANs:  (none)\n"
        "    IP SANs:   (none)\n"
        "X.509 trust bundles: 2\n"
        "  example.org: 1 CA certificate\n"
        "  other.org: 1 CA certificate\n"
        "JWT-SVIDs for audience payments: 1\n"
        "  spiffe://example.org/web\n"
        "    hint:   web\n"
        f"{expiry_line}\n"
        f"    token:  {token}\n"
        "JWT bundles: 1\n"
        "  example.org: key IDs test-kid-1\n"
    )
    assert token.count(".") == 2
    assert all(c.metadata.get("workload.spiffe.io") == "true" for c in fake.calls)
    # Without --show-token the bearer token is never printed whole.
    code, out, err = await inspect(capsys, "--path", fake.address, "--audience", "payments")
    assert (code, err) == (0, "")
    assert token not in out
    assert f"    token:  {token[:16]}... ({len(token)} chars; --show-token prints it)\n" in out


async def test_inspect_json(
    fake: FakeWorkloadApi, world: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    web, db = world["web"], world["db"]
    code, out, err = await inspect(capsys, "--path", fake.address, "--json", "--audience", "a")
    assert (code, err) == (0, "")
    report = json.loads(out)
    [jwt] = report.pop("jwt_svids")
    assert report == {
        "address": fake.address,
        "x509_svids": [
            {
                "spiffe_id": "spiffe://example.org/web",
                "hint": "web",
                "serial": f"{web.serial:x}",  # type: ignore[attr-defined]
                "not_after": _iso(web.not_after),  # type: ignore[attr-defined]
                "dns_sans": ["web.example.org", "web"],
                "ip_sans": ["10.0.0.7"],
            },
            {
                "spiffe_id": "spiffe://example.org/db",
                "hint": "",
                "serial": f"{db.serial:x}",  # type: ignore[attr-defined]
                "not_after": _iso(db.not_after),  # type: ignore[attr-defined]
                "dns_sans": [],
                "ip_sans": [],
            },
        ],
        "x509_bundles": [
            {"trust_domain": "example.org", "ca_count": 1},
            {"trust_domain": "other.org", "ca_count": 1},
        ],
        "jwt_audience": ["a"],
        "jwt_bundles": [{"trust_domain": "example.org", "key_ids": ["test-kid-1"]}],
    }
    assert sorted(jwt) == ["expiry", "hint", "spiffe_id", "token"]
    assert (jwt["spiffe_id"], jwt["hint"]) == ("spiffe://example.org/web", "web")


async def test_inspect_without_audience_fetches_no_jwt_svid(
    fake: FakeWorkloadApi, world: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await inspect(capsys, "--path", fake.address, "--json")
    assert code == 0
    assert json.loads(out)["jwt_svids"] is None
    assert fake.count("FetchJWTSVID") == 0


async def test_inspect_uses_spiffe_endpoint_socket(
    fake: FakeWorkloadApi,
    world: dict[str, object],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", fake.address)
    code, out, _ = await inspect(capsys, "--json")
    assert code == 0 and json.loads(out)["address"] == fake.address


async def test_inspect_missing_socket(sockdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    address = f"unix://{sockdir}/missing.sock"
    code, out, err = await inspect(capsys, "--path", address)
    assert (code, out) == (1, "")
    assert err == f"sds inspect: workload API at {address} is unavailable: socket not found\n"


async def test_inspect_permission_denied(
    fake: FakeWorkloadApi, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await inspect(capsys, "--path", fake.address)  # no identity set
    assert (code, out) == (1, "")
    assert err == "sds inspect: permission denied: no identity issued\n"


async def test_inspect_bad_address_and_no_address(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = await inspect(capsys, "--path", "localhost:8081")
    assert code == 2
    assert err == (
        "sds inspect: workload API address 'localhost:8081' must be unix:///path or tcp://ip:port\n"
    )
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET", raising=False)
    code, _, err = await inspect(capsys)
    assert code == 2
    assert err == (
        "sds inspect: no workload API address: set SPIFFE_ENDPOINT_SOCKET or pass --path\n"
    )


async def test_inspect_times_out_on_a_silent_server(
    sockdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sockdir / "silent.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)  # connections queue in the backlog; nothing ever answers
    try:
        code, out, err = await inspect(capsys, "--path", f"unix://{path}", "--timeout", "0.3")
    finally:
        listener.close()
    assert (code, out) == (1, "")
    assert err == f"sds inspect: workload API at unix://{path} did not answer within 0.3s\n"


class SpireLikeSds:
    """What SPIRE agent's SDS does that matters to ``inspect --sds``: more than one bundle
    name in one request, or a name it does not know, ends the stream with INVALID_ARGUMENT."""

    def __init__(self, specs: dict[str, Any]) -> None:
        self.specs = specs
        self.requests: list[list[str]] = []

    def __mapping__(self) -> dict[str, Any]:
        from grpclib.const import Cardinality, Handler

        from sds.xds.codec import DiscoveryResponse, LiteRequest

        return {
            "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets": Handler(
                self._stream, Cardinality.STREAM_STREAM, LiteRequest, DiscoveryResponse
            )
        }

    async def _stream(self, stream: Any) -> None:
        from grpclib.const import Status
        from grpclib.exceptions import GRPCError

        from sds.xds.codec import render_secret, sotw_response

        names = list((await stream.recv_message()).resource_names)
        self.requests.append(names)
        bundles = [n for n in names if n in ("ROOTCA", "ALL") or n.count("/") == 2]
        if len(bundles) > 1:
            raise GRPCError(Status.INVALID_ARGUMENT, "only one bundle name per request")
        for name in names:
            if name not in self.specs:
                raise GRPCError(Status.INVALID_ARGUMENT, f"unknown resource {name}")
        rendered = [render_secret(n, self.specs[n], trusted_ca=False) for n in names]
        await stream.send_message(sotw_response("v1", rendered, "n1"))
        await stream.recv_message()


async def test_inspect_sds_against_spire_asks_per_name(
    sockdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import datetime as dt

    from grpclib.server import Server

    from sds.provider.ca import LocalCA
    from sds.spiffe.id import SpiffeId, TrustDomain
    from sds.xds.resources import TlsSpec, ValidationSpec

    td = TrustDomain.parse("example.org")
    ca = LocalCA.ephemeral(td)
    svid = ca.issue_x509_svid(SpiffeId.from_path(td, "/web"), dt.timedelta(hours=1))
    bundle = ValidationSpec((ca.bundle,))
    fake = SpireLikeSds({"default": TlsSpec(svid), "ROOTCA": bundle, "ALL": bundle})
    server = Server([fake])
    path = sockdir / "spire-sds.sock"
    await server.start(path=str(path))
    try:
        code, out, err = await inspect(
            capsys,
            "--sds",
            f"unix://{path}",
            "--json",
            "--name",
            "default",
            "--name",
            "ROOTCA",
            "--name",
            "ALL",
            "--name",
            "bogus",
        )
    finally:
        server.close()
        await server.wait_closed()
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert fake.requests == [
        ["default", "ROOTCA", "ALL", "bogus"],
        ["default"],
        ["ROOTCA"],
        ["ALL"],
        ["bogus"],
    ]
    assert [item["name"] for item in report["secrets"]] == ["default", "ROOTCA", "ALL"]
    assert report["secrets"][0]["spiffe_id"] == "spiffe://example.org/web"
    assert report["refused"] == {"bogus": "INVALID_ARGUMENT: unknown resource bogus"}
    assert report["not_served"] == []
