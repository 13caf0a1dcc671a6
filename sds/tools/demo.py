"""``sds demo``: the whole mTLS topology on one machine, and a plain-words account of it.

Starts the embedded Workload API provider, one bridge per identity, two
Envoy sidecars (plus an intruder's), an unmodified plain-HTTP app and drives
a plain-HTTP client through them. Then it checks and prints: an allowed call
over mTLS (with both SPIFFE IDs), a refused caller, a rotation with traffic
flowing, a JWT-SVID verified by the receiving Envoy (forged and wrong-audience
tokens refused), and a native py-spiffe client calling the app directly.

``--once`` exits after the checks (0 if every claim held); otherwise the
topology keeps running until Ctrl-C, and everything started is stopped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sds._util.procs import Children

__all__ = ["add_arguments", "run"]

TRUST_DOMAIN = "demo.example"
_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
AUDIENCE = "demo-app"
# A well-formed ES256 JWT-SVID for spiffe://demo.example/client that no key signed.
_FORGED_JWT = (
    "eyJhbGciOiJFUzI1NiIsImtpZCI6IngifQ."
    "eyJzdWIiOiJzcGlmZmU6Ly9kZW1vLmV4YW1wbGUvY2xpZW50IiwiYXVkIjpbImRlbW8tYXBwIl0sImV4cCI6NDEwMjQ0NDgwMH0."
    "AAAA"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="run the checks, then stop and exit")
    parser.add_argument(
        "--workdir", metavar="DIR", help="keep sockets, configs and logs here (default: temp)"
    )
    parser.add_argument(
        "--rotation-ttl",
        default="12s",
        metavar="DURATION",
        help="lifetime of the server's SVID; it rotates at half of it (default 12s)",
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _envoy_binary() -> str:
    import importlib.util  # noqa: PLC0415

    from sds.errors import ConfigError  # noqa: PLC0415

    spec = importlib.util.find_spec("envoy")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "_bin" / "envoy"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("envoy")
    if found:
        return found
    raise ConfigError(
        "the demo needs Envoy: install the dev extra (pip install -e '.[dev]'; ./dev.sh demo does)"
    )


class _Say:
    def __init__(self) -> None:
        self.results: list[bool] = []

    def step(self, text: str) -> None:
        print(f"  .. {text}", flush=True)

    def check(self, ok: bool, text: str) -> None:
        self.results.append(ok)
        print(f"[{'ok' if ok else 'FAIL'}] {text}", flush=True)


class Demo:
    """The processes of the demo and the checks run against them."""

    def __init__(self, workdir: Path, rotation_ttl: str) -> None:
        self.dir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.rotation_ttl = rotation_ttl
        self.children = Children(self.logs)
        self.workload = workdir / "workload.sock"
        self.ids = {
            name: f"spiffe://{TRUST_DOMAIN}/{name}" for name in ("server", "client", "intruder")
        }
        self.ports = {
            name: _free_port()
            for name in (
                "app",
                "inbound",
                "outbound",
                "intruder_out",
                "a_server",
                "a_client",
                "a_intruder",
                "e_server",
                "e_client",
                "e_intruder",
            )
        }
        self.envoy = _envoy_binary()
        self.say = _Say()

    # -- processes ---------------------------------------------------------------------------

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        return self.children.start(argv, name)

    def stop(self) -> None:
        """Stop everything started, all at once (5 s grace, then SIGKILL)."""
        self.children.close(timeout=5)

    def _wait(self, what: str, predicate: Any, timeout: float = 30.0) -> Any:
        """``predicate()`` once truthy; WaitFailed on timeout or when a child exits first."""
        return self.children.wait_until(predicate, timeout, what)

    def start(self) -> None:
        import yaml  # noqa: PLC0415

        from sds.tools.bootstrap import (  # noqa: PLC0415
            BootstrapOptions,
            Inbound,
            Outbound,
            bridge_policy,
            build_bootstrap,
            to_envoy_yaml,
        )

        py = sys.executable
        ids_docs = []
        for name in ("server", "client", "intruder"):
            ttl = self.rotation_ttl if name == "server" else "1h"
            ids_docs.append(
                {
                    "kind": "workload_identity",
                    "version": "v1",
                    "metadata": {"name": name},
                    "spec": {
                        "spiffe": {"id": f"/{name}", "hint": name, "x509": {"maximum_ttl": ttl}}
                    },
                }
            )
        (self.dir / "identities.yaml").write_text(yaml.safe_dump_all(ids_docs))
        self.say.step(
            f"starting the Workload API provider (trust domain {TRUST_DOMAIN}, local CA in memory)"
        )
        self._start(
            "workload-api",
            [
                py,
                "-m",
                "sds",
                "workload-api",
                "--socket",
                str(self.workload),
                "--trust-domain",
                TRUST_DOMAIN,
                "--identities",
                str(self.dir / "identities.yaml"),
                "--ephemeral",
            ],
        )
        self._wait("the Workload API socket", self.workload.exists)
        self._start("app", [py, "-m", "sds.tools.demoapp", str(self.ports["app"])])

        p = self.ports
        expect_server = (self.ids["server"],)
        server = BootstrapOptions(
            node_id="server-sidecar",
            sds_socket=str(self.dir / "server" / "sds.sock"),
            inbound=Inbound(p["inbound"], "127.0.0.1", p["app"], address="127.0.0.1"),
            allow=(self.ids["client"],),
            admin_port=p["e_server"],
            jwt_audience=AUDIENCE,
            jwks_uri=f"http://127.0.0.1:{p['a_server']}/jwks/{TRUST_DOMAIN}",
        )
        client = BootstrapOptions(
            node_id="client-sidecar",
            sds_socket=str(self.dir / "client" / "sds.sock"),
            outbounds=(
                Outbound("127.0.0.1", p["outbound"], "127.0.0.1", p["inbound"], expect_server),
            ),
            admin_port=p["e_client"],
            jwt_audience=AUDIENCE,
        )
        intruder = BootstrapOptions(
            node_id="intruder-sidecar",
            sds_socket=str(self.dir / "intruder" / "sds.sock"),
            outbounds=(
                Outbound("127.0.0.1", p["intruder_out"], "127.0.0.1", p["inbound"], expect_server),
            ),
            admin_port=p["e_intruder"],
        )
        for name, options in (("server", server), ("client", client), ("intruder", intruder)):
            config: dict[str, Any] = {
                "workload_api": f"unix://{self.workload}",
                "listen": f"unix://{options.sds_socket}",
                "admin": f"127.0.0.1:{p['a_' + name]}",
                "default_svid": {"hint": name},
            }
            config.update(bridge_policy(options) or {})
            (self.dir / f"bridge-{name}.yaml").write_text(yaml.safe_dump(config))
            (self.dir / f"envoy-{name}.yaml").write_text(to_envoy_yaml(build_bootstrap(options)))
            self.say.step(
                f"starting the {name}'s bridge and Envoy sidecar (identity {self.ids[name]})"
            )
            self._start(
                f"bridge-{name}",
                [py, "-m", "sds", "run", "--config", str(self.dir / f"bridge-{name}.yaml")],
            )
            self._start(
                f"envoy-{name}",
                [
                    self.envoy,
                    "-c",
                    str(self.dir / f"envoy-{name}.yaml"),
                    "--disable-hot-restart",
                    "--concurrency",
                    "1",
                    "--log-level",
                    "warn",
                    "--base-id",
                    str(_free_port()),
                ],
            )
        for name in ("server", "client", "intruder"):
            self._wait(
                f"the {name} Envoy to be ready",
                lambda n=name: self._http(p["e_" + n], "/ready")[0] == 200,
            )

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _http(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        import http.client  # noqa: PLC0415

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        except OSError:
            return 0, b""
        finally:
            conn.close()

    def _served_serial(self, bridge: str) -> str | None:
        import json  # noqa: PLC0415

        status, body = self._http(self.ports["a_" + bridge], "/secrets")
        if status != 200:
            return None
        for item in json.loads(body):
            if item["name"] == "default":
                return str(item["serial"])
        return None

    def _client_material(self) -> tuple[bytes, bytes, bytes]:
        import asyncio  # noqa: PLC0415

        from sds.workloadapi.client import WorkloadApiClient  # noqa: PLC0415

        async def fetch() -> Any:
            async with WorkloadApiClient(f"unix://{self.workload}") as client:
                return await client.fetch_x509_context()

        ctx = asyncio.run(fetch())
        svid = ctx.find(hint="client")
        bundle = ctx.bundles[svid.spiffe_id.trust_domain]
        return svid.chain_pem(), svid.key_pem(), bundle.pem()

    def _direct(self, headers: dict[str, str] | None = None) -> tuple[int, bytes, str, int]:
        """mTLS straight to the server's Envoy as the client: status, body, peer ID, serial."""
        import http.client  # noqa: PLC0415
        import ssl  # noqa: PLC0415

        from cryptography import x509  # noqa: PLC0415

        cert, key, ca = self._client_material()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cadata=ca.decode())
        files = self.dir / "client-tls"
        files.mkdir(mode=0o700, exist_ok=True)
        (files / "c.pem").write_bytes(cert)
        key_path = files / "k.pem"
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        try:
            context.load_cert_chain(files / "c.pem", key_path)
        finally:
            key_path.unlink()
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.ports["inbound"], context=context, timeout=5
        )
        try:
            conn.request("GET", "/", headers=headers or {})
            response = conn.getresponse()
            sock = conn.sock
            assert isinstance(sock, ssl.SSLSocket)
            der = sock.getpeercert(binary_form=True)
            assert der is not None
            leaf = x509.load_der_x509_certificate(der)
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uri = san.get_values_for_type(x509.UniformResourceIdentifier)[0]
            return response.status, response.read(), uri, leaf.serial_number
        finally:
            conn.close()

    # -- the story -------------------------------------------------------------------------------

    def scenario(self) -> bool:
        """Run the five checks, print one plain-words line each; True if all held."""
        print()
        self._check_allowed()
        self._check_refused()
        self._check_rotation()
        self._check_jwt()
        self._check_native_client()
        print()
        failed = self.say.results.count(False)
        if failed:
            print(f"{failed} of {len(self.say.results)} checks failed; logs are in {self.logs}")
        else:
            print(f"All {len(self.say.results)} checks passed.")
        return failed == 0

    def _check_allowed(self) -> None:
        import json  # noqa: PLC0415

        status, body = self._http(self.ports["outbound"], "/")
        answer = json.loads(body) if status == 200 else {}
        _, _, presented, _ = self._direct()
        caller = answer.get("caller")
        self.say.check(
            status == 200 and caller == self.ids["client"] and presented == self.ids["server"],
            f"allowed: the client app sent plain HTTP to its Envoy "
            f"(127.0.0.1:{self.ports['outbound']}) and reached the app over mTLS. The app saw "
            f"caller {caller}; the server's Envoy presented {presented}.",
        )

    def _check_refused(self) -> None:
        status, _ = self._http(self.ports["intruder_out"], "/")
        self.say.check(
            status == 503,
            f"refused: {self.ids['intruder']} is not in the server's allow list; the server's "
            f"Envoy rejected it in the TLS handshake, so the intruder's Envoy answered {status}.",
        )

    def _check_rotation(self) -> None:
        import threading  # noqa: PLC0415

        before = self._served_serial("server")
        counts = {"ok": 0, "failed": 0}
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                code, _ = self._http(self.ports["outbound"], "/")
                counts["ok" if code == 200 else "failed"] += 1
                stop.wait(0.05)

        def rotated() -> str | None:
            serial = self._served_serial("server")
            return serial if serial and serial != before else None

        worker = threading.Thread(target=loop, daemon=True)
        worker.start()
        try:
            after = self._wait("the server's SVID to rotate", rotated, 60)
            self._wait(
                "Envoy to present the new certificate",
                lambda: f"{self._direct()[3]:x}" == after,
                10,
            )
            time.sleep(0.5)  # a little traffic on the new certificate, too
        finally:
            stop.set()
            worker.join(5)
        self.say.check(
            counts["failed"] == 0 and counts["ok"] > 0,
            f"rotation: the server's SVID rotated (serial {str(before)[:12]}... -> "
            f"{str(after)[:12]}...) and its Envoy presents the new one; "
            f"{counts['ok']} requests during the rotation, {counts['failed']} failed.",
        )

    def _check_jwt(self) -> None:
        import json  # noqa: PLC0415

        status, body = self._http(self.ports["outbound"], "/")
        subject = (json.loads(body) if status == 200 else {}).get("jwt_subject")
        forged, _, _, _ = self._direct({"authorization": f"Bearer {_FORGED_JWT}"})
        wrong = self._jwt_for("another-audience")
        wrong_status, _, _, _ = self._direct({"authorization": f"Bearer {wrong}"})
        missing, _, _, _ = self._direct()
        # Envoy's jwt_authn answers 401 for a missing, forged or expired token and 403
        # for a valid token meant for another audience (RFC 6750 insufficient_scope).
        self.say.check(
            subject == self.ids["client"]
            and forged == 401
            and missing == 401
            and wrong_status == 403,
            f"jwt: the client's Envoy attached a JWT-SVID for audience {AUDIENCE!r} from its "
            f"bridge, and the server's Envoy verified it against the bridge's JWKS (the app saw "
            f"subject {subject}). Without a token: {missing}; a forged token: {forged}; a valid "
            f"token for another audience: {wrong_status}.",
        )

    def _check_native_client(self) -> None:
        native = subprocess.run(
            [
                sys.executable,
                str(_EXAMPLES / "pyspiffe_client.py"),
                f"unix://{self.workload}",
                self.ids["client"],
                f"https://127.0.0.1:{self.ports['inbound']}/",
                AUDIENCE,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        said = native.stdout.strip() or native.stderr.strip()[-300:]
        self.say.check(
            native.returncode == 0 and self.ids["client"] in native.stdout,
            f"native client: a py-spiffe program took {self.ids['client']} (X.509 and JWT) from "
            f"the Workload API and called the Envoy-fronted app over mTLS directly: {said}",
        )

    def _jwt_for(self, audience: str) -> str:
        import asyncio  # noqa: PLC0415

        from sds.workloadapi.client import WorkloadApiClient  # noqa: PLC0415

        async def fetch() -> str:
            async with WorkloadApiClient(f"unix://{self.workload}") as client:
                svids = await client.fetch_jwt_svids([audience], self.ids["client"])
                return svids[0].token

        return asyncio.run(fetch())


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sds-demo-"))
    os.chmod(workdir, 0o700)
    demo = Demo(workdir, args.rotation_ttl)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    ok = False
    try:
        print(f"sds demo: everything runs on this machine; files in {workdir}")
        demo.start()
        ok = demo.scenario()
        if not args.once:
            print("\nThe topology keeps running; try:")
            outbound, admin = demo.ports["outbound"], demo.ports["a_server"]
            print(f"  curl http://127.0.0.1:{outbound}/   (via the client's Envoy)")
            print(
                f"  .venv/bin/sds inspect --sds unix://{workdir}/server/sds.sock "
                f"--admin 127.0.0.1:{admin}"
            )
            print("Ctrl-C to stop.")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass  # Ctrl-C (or SIGTERM) ends the demo; the exit code reports the checks
    except RuntimeError as exc:
        print(f"sds demo: {exc}", file=sys.stderr)
    finally:
        demo.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        print("sds demo: stopped everything it started.")
    return 0 if ok else 1
