"""``sds run``: consume the Workload API and serve Envoy SDS until SIGTERM.

Startup order matters to Envoy and Istio, which probe the socket: the admin
endpoint comes up first (``/readyz`` says 503 with a reason), the upstream
watch starts, and the SDS socket is bound only once the first valid X.509
context has arrived, so anything that finds the socket can get secrets.
SIGHUP reloads the config file without dropping streams; SIGTERM and SIGINT
stop gracefully and remove the socket.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see docs/configuration.md)")
    parser.add_argument(
        "--workload-api",
        action="append",
        default=[],
        metavar="ADDR",
        help="upstream Workload API, unix:///path or tcp://ip:port (repeatable; "
        "default: $SPIFFE_ENDPOINT_SOCKET)",
    )
    parser.add_argument(
        "--listen", metavar="ADDR", help="unix:///path (default) or tcp://127.0.0.1:PORT"
    )
    parser.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="loopback HTTP for /readyz, /metrics ('off' to disable)",
    )


def run(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from .config import BridgeConfig, load_config  # noqa: PLC0415

    config = load_config(args.config) if args.config else BridgeConfig(source="flags")
    config = config.with_overrides(
        workload_api=args.workload_api, listen=args.listen, admin=args.admin
    )
    if config.listen is None:
        from ..errors import ConfigError  # noqa: PLC0415

        raise ConfigError("no SDS listen address: set listen in the config or pass --listen")
    return asyncio.run(_main(config, args.config))


async def _main(config: Any, config_path: str | None) -> int:
    import asyncio  # noqa: PLC0415
    import logging  # noqa: PLC0415
    import signal  # noqa: PLC0415

    from grpclib.server import Server  # noqa: PLC0415

    from .._log import event  # noqa: PLC0415
    from .._peercred import bind_unix_socket  # noqa: PLC0415
    from .._workloadapi import Watcher, WorkloadApiClient  # noqa: PLC0415
    from ..errors import ConfigError, SdsServerError, WorkloadApiDenied  # noqa: PLC0415
    from .admin import AdminServer, Response  # noqa: PLC0415
    from .bridge import Bridge  # noqa: PLC0415
    from .config import load_config  # noqa: PLC0415
    from .jwt import JwtSvidManager, JwtToken  # noqa: PLC0415
    from .metrics import Metrics  # noqa: PLC0415
    from .server import AccessPolicy, PassthroughCodec, SdsServicer  # noqa: PLC0415

    log = logging.getLogger("sds.run")
    loop = asyncio.get_running_loop()
    if config.listen.path is not None:
        _check_socket_dir(config.listen.path)  # fail fast, before waiting for upstream
    metrics = Metrics()
    addresses = list(config.workload_api) or [None]
    watchers = [Watcher(address, events=metrics) for address in addresses]
    bridge = Bridge(config, watchers, metrics=metrics)
    jwt_clients = {str(w.address): WorkloadApiClient(w.address) for w in watchers}

    async def fetch_jwt(audience: str, spiffe_id: str | None) -> JwtToken:
        # From the upstream serving that identity's X.509-SVID (it is the one that is up).
        serving = bridge.selection.serving.get(spiffe_id or "", str(watchers[0].address))
        jwt_client = jwt_clients.get(serving) or jwt_clients[str(watchers[0].address)]
        svids = await jwt_client.fetch_jwt_svids([audience], spiffe_id)
        if not svids:
            raise WorkloadApiDenied(f"no JWT-SVID issued for audience {audience!r}")
        svid = svids[0]
        return JwtToken(svid.token, str(svid.spiffe_id), svid.expiry.timestamp())

    bridge.jwt = JwtSvidManager(fetch_jwt, bridge.refresh, spiffe_id=bridge.default_spiffe_id)
    servicer = SdsServicer(
        bridge.cache,
        access=AccessPolicy(config.allowed_uids, config.allowed_gids),
        disable_spiffe_cert_validation=config.disable_spiffe_cert_validation,
        events=metrics,
        on_missing=bridge.demand,
    )

    def jwks(trust_domain: str) -> Response:
        for watcher in watchers:
            for td, bundle in watcher.jwt_bundles().items():
                if td.name == trust_domain:
                    return Response(200, bundle.to_jwks(), "application/json")
        return Response(404, f"no JWT bundle for trust domain {trust_domain!r}\n".encode())

    def readyz() -> Response:
        detail = bridge.upstreams_text().encode() if len(watchers) > 1 else b""
        if bridge.ready:
            return Response(200, b"ready\n" + detail)
        if not any(w.current() for w in watchers):
            return Response(
                503, b"not ready: no X.509 context from the Workload API yet\n" + detail
            )
        return Response(503, b"not ready: no valid SVID to serve (expired or withdrawn)\n" + detail)

    def secrets_view() -> Response:
        out = []
        for name in bridge.cache.names():
            spec = bridge.cache.spec(name)
            item: dict[str, Any] = {"name": name, "version": bridge.cache.resource_version(name)}
            svid = getattr(spec, "svid", None)
            if svid is not None:
                item |= {
                    "type": "tls_certificate",
                    "spiffe_id": str(svid.spiffe_id),
                    "serial": f"{svid.serial:x}",
                    "not_after": svid.not_after.isoformat(),
                }
            else:
                item |= {
                    "type": "validation_context",
                    "trust_domains": [b.trust_domain.name for b in getattr(spec, "bundles", ())],
                }
            out.append(item)
        return Response.json(out)

    admin = None
    if config.admin.port is not None:
        admin = AdminServer(
            config.admin.host,
            config.admin.port,
            {
                "/healthz": lambda: Response(200, b"ok\n"),
                "/readyz": readyz,
                "/metrics": lambda: Response(
                    200, metrics.render(), "text/plain; version=0.0.4; charset=utf-8"
                ),
                "/envoys": lambda: Response.json(
                    [info.as_dict() for info in servicer.streams.values()]
                ),
                "/secrets": secrets_view,
                "/upstreams": lambda: Response.json(bridge.upstreams_view()),
            },
            {"/jwks/": jwks},
        )
        try:
            await admin.start()
        except OSError as exc:
            raise ConfigError(
                f"admin: cannot listen on {config.admin.host}:{config.admin.port}: {exc.strerror}"
            ) from exc

    stop = asyncio.Event()
    first = asyncio.Event()
    bridge.on_change(lambda: first.set() if bridge.ready else None)
    tasks = [asyncio.create_task(w.run(), name=f"watch-{i}") for i, w in enumerate(watchers)]

    def reload() -> None:
        if config_path is None:
            event(log, logging.WARNING, "config.reload_skipped", reason="no --config file")
            return
        try:
            fresh = load_config(config_path).with_overrides(
                workload_api=list(bridge.config.workload_api),
                listen=str(bridge.config.listen),
            )
        except ConfigError as exc:
            event(log, logging.ERROR, "config.reload_failed", error=str(exc), kept="previous")
            return
        if fresh.listen != bridge.config.listen or fresh.workload_api != bridge.config.workload_api:
            event(log, logging.WARNING, "config.restart_needed", keys="listen,workload_api")
        servicer.access = AccessPolicy(fresh.allowed_uids, fresh.allowed_gids)
        servicer.disable_spiffe_cert_validation = fresh.disable_spiffe_cert_validation
        bridge.reconfigure(fresh)
        event(log, logging.INFO, "config.reloaded", source=config_path)

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    upstreams = ",".join(str(w.address) for w in watchers)
    event(log, logging.INFO, "bridge.starting", upstreams=upstreams)
    waiting = asyncio.create_task(first.wait())
    stopping = asyncio.create_task(stop.wait())
    while not first.is_set() and not stop.is_set():
        await asyncio.wait({waiting, stopping}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if not first.is_set() and not stop.is_set():
            event(
                log,
                logging.WARNING,
                "bridge.waiting",
                reason="no valid X.509 SVID from upstream yet",
            )
    waiting.cancel()

    server = Server([servicer], codec=PassthroughCodec())
    listen = config.listen
    socket_path = listen.path
    if not stop.is_set():
        try:
            if socket_path is not None:
                sock = bind_unix_socket(socket_path, config.socket_mode)
                await server.start(sock=sock)
            else:
                event(
                    log,
                    logging.WARNING,
                    "sds.tcp_listen",
                    address=str(listen),
                    risk="TCP callers cannot be identified; any local process can fetch keys",
                )
                await server.start(listen.host, listen.port)
        except OSError as exc:
            raise SdsServerError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
        event(
            log, logging.INFO, "sds.listening", address=str(listen), mode=f"{config.socket_mode:o}"
        )
        await stopping

    event(log, logging.INFO, "bridge.stopping")
    server.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 5)
    if socket_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
    await bridge.jwt.close()
    for jwt_client in jwt_clients.values():
        jwt_client.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if admin is not None:
        await admin.close()
    return 0


def _check_socket_dir(path: str) -> None:
    """Create the socket's directory 0700 if missing; refuse one others could swap files in."""
    import stat  # noqa: PLC0415

    from ..errors import SdsServerError  # noqa: PLC0415

    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        return
    info = os.stat(directory)
    writable_by_others = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and not info.st_mode & stat.S_ISVTX and info.st_uid != os.getuid():
        raise SdsServerError(
            f"socket directory {directory} is writable by others and not ours; "
            "use a directory we own (mode 0700 or 0750)"
        )
