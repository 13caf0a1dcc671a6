"""A whole single-host stack for end-to-end tests: provider, bridge and client SVIDs.

The provider (``sds workload-api``) and the bridge (``sds run``) run as real
subprocesses; identities carry no rules, so every local caller (the bridge
and the test's client) is issued all of them: ``web`` first (the bridge's
``default``), then the clients.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sds.spiffe.x509 import X509Context, X509Svid
from sds.workloadapi.client import WorkloadApiClient
from tests.harness.procs import Processes, wait_for

TRUST_DOMAIN = "example.org"
IDENTITIES = ("web", "client-a", "client-b")


@dataclass
class Material:
    """PEMs a TLS client needs: its chain, key, and the CA to verify the server."""

    cert: bytes
    key: bytes
    ca: bytes
    spiffe_id: str


def identities_yaml(names: tuple[str, ...] = IDENTITIES) -> str:
    """Identities without rules; clients get a 1 h TTL so only the server's SVID rotates
    when the provider runs with a short default TTL."""
    docs = []
    for name in names:
        spiffe: dict[str, Any] = {"id": f"/{name}", "hint": name}
        if name != "web":
            spiffe["x509"] = {"maximum_ttl": "1h"}
        docs.append(
            {
                "kind": "workload_identity",
                "version": "v1",
                "metadata": {"name": name},
                "spec": {"spiffe": spiffe},
            }
        )
    return yaml.safe_dump_all(docs)


def svc_identities(*identities: tuple[str, str | None]) -> str:
    """``workload_identity`` documents, one per ``(name, condition)``: ID ``/svc/<name>``,
    hint ``name``, allowed when ``workload.unix.uid`` meets ``condition`` (e.g.
    ``"eq: {value: 1000}"``), or with no rules when it is None."""
    docs = []
    for name, condition in identities:
        doc = (
            "kind: workload_identity\nversion: v1\n"
            f"metadata: {{name: {name}}}\n"
            f"spec:\n  spiffe: {{id: /svc/{name}, hint: {name}}}\n"
        )
        if condition is not None:
            doc += (
                "  rules:\n    allow:\n"
                f"      - conditions: [{{attribute: workload.unix.uid, {condition}}}]\n"
            )
        docs.append(doc)
    return "---\n".join(docs)


class Stack:
    """Starts and restarts the provider and the bridge for one test."""

    def __init__(self, procs: Processes, workdir: Path, *, x509_ttl: str = "1h") -> None:
        self.procs = procs
        self.dir = workdir
        self.x509_ttl = x509_ttl
        self.workload_socket = workdir / "workload.sock"
        self.sds_socket = workdir / "sds" / "sds.sock"
        self.config_path = workdir / "sds.yaml"
        self.identities = workdir / "identities.yaml"
        self.identities.write_text(identities_yaml())
        self.admin_port = 0
        self.provider: Any = None
        self.bridge: Any = None

    # -- processes --------------------------------------------------------------------------

    def provider_args(self) -> list[str]:
        """``sds`` arguments of the provider (one state dir, so restarts keep the CA)."""
        return [
            "workload-api",
            "--socket",
            str(self.workload_socket),
            "--trust-domain",
            TRUST_DOMAIN,
            "--identities",
            str(self.identities),
            "--state-dir",
            str(self.dir / "ca"),
            "--x509-ttl",
            self.x509_ttl,
        ]

    def start_provider(self) -> None:
        if self.workload_socket.exists():
            self.workload_socket.unlink()
        self.provider = self.procs.sds(*self.provider_args(), name="provider")
        wait_for(self.workload_socket.exists, 15, "workload API socket")

    def write_config(self, **extra: Any) -> None:
        config = {
            "workload_api": f"unix://{self.workload_socket}",
            "listen": f"unix://{self.sds_socket}",
            "admin": "127.0.0.1:0",
            **extra,
        }
        self.config_path.write_text(yaml.safe_dump(config))

    def start_bridge(self) -> None:
        if not self.config_path.exists():
            self.write_config()
        self.bridge = self.procs.sds(
            "--log-level", "DEBUG", "run", "--config", str(self.config_path), name="bridge"
        )
        wait_for(self.sds_socket.exists, 15, "SDS socket")
        self.admin_port = int(
            wait_for(self._admin_port_from_log, 10, "bridge admin port in the log")
        )

    def _admin_port_from_log(self) -> str | None:
        for line in reversed(self.procs.log(self.bridge).splitlines()):
            if "admin.listening" in line:
                return line.rsplit(":", 1)[1]
        return None

    # -- views ------------------------------------------------------------------------------

    def admin(self, path: str) -> Any:
        return json.loads(self.admin_text(path))

    def admin_text(self, path: str) -> str:
        """The body of an admin GET, whatever its status (``/readyz`` answers 503 with text)."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.admin_port}{path}", timeout=5
            ) as r:
                return str(r.read().decode())
        except urllib.error.HTTPError as exc:
            return str(exc.read().decode())

    def served_serial(self, name: str = "default") -> int:
        for item in self.admin("/secrets"):
            if item["name"] == name:
                return int(item["serial"], 16)
        raise KeyError(name)

    def context(self) -> X509Context:
        async def fetch() -> X509Context:
            async with WorkloadApiClient(f"unix://{self.workload_socket}") as client:
                return await client.fetch_x509_context()

        return asyncio.run(fetch())

    def material(self, name: str) -> Material:
        ctx = self.context()
        svid: X509Svid | None = ctx.find(hint=name)
        assert svid is not None, f"no SVID with hint {name}"
        bundle = ctx.bundles[svid.spiffe_id.trust_domain]
        return Material(svid.chain_pem(), svid.key_pem(), bundle.pem(), str(svid.spiffe_id))
