"""The embedded Workload API provider (``sds workload-api``) as a managed process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sds.provider.ca import LocalCA
from sds.spiffe.id import TrustDomain
from tests.harness.procs import Processes, wait_for

WEB = (
    "kind: workload_identity\nversion: v1\nmetadata: {name: web}\n"
    "spec:\n  spiffe: {id: /svc/web, hint: web}\n"
)


def write_identities(directory: Path, text: str = WEB) -> Path:
    """``directory``/ids.yaml holding ``text`` (one web identity by default)."""
    path = directory / "ids.yaml"
    path.write_text(text)
    return path


def provider_args(sock: Path, identities: Path, *extra: str) -> list[str]:
    """``sds workload-api`` arguments for trust domain example.org on ``sock``."""
    return [
        "workload-api",
        "--socket",
        str(sock),
        "--trust-domain",
        "example.org",
        "--identities",
        str(identities),
        *extra,
    ]


def start_provider(
    procs: Processes,
    sock: Path,
    identities: Path,
    *extra: str,
    timeout: float = 10.0,
    **kwargs: Any,
) -> Any:
    """Start ``sds workload-api`` (see provider_args) and wait until it logs provider.ready."""
    proc = procs.sds(*provider_args(sock, identities, *extra), name="provider", **kwargs)
    wait_for(
        lambda: "provider.ready" in procs.log(proc) or proc.poll() is not None,
        timeout,
        "provider.ready",
    )
    assert proc.poll() is None, procs.log(proc)
    return proc


def start_federated_provider(
    procs: Processes, sock: Path, directory: Path, identities: str, *extra: str, **kwargs: Any
) -> Any:
    """start_provider with ``identities`` (YAML text) and an ephemeral partner.org bundle."""
    federated = directory / "partner.pem"
    federated.write_bytes(LocalCA.ephemeral(TrustDomain("partner.org")).bundle.pem())
    ids = write_identities(directory, identities)
    federate = ("--federate", f"partner.org={federated}")
    return start_provider(procs, sock, ids, "--ephemeral", *federate, *extra, **kwargs)
