"""``sds run``: consume the Workload API and serve Envoy SDS until SIGTERM.

Startup order matters to Envoy and Istio, which probe the socket: the admin
endpoint comes up first (``/readyz`` says 503 with a reason), the upstream
watch starts, and the SDS socket is bound only once the first valid X.509
context has arrived, so anything that finds the socket can get secrets.

The socket's directory must be ours (or root's) and not writable by others
without the sticky bit; a socket path where something still accepts
connections is refused (another bridge owns it); only a stale socket is
replaced; on exit the socket is removed only if it is still our inode.
Every start-up failure is one line and exit 2.

SIGHUP reloads the config file without dropping streams: the file is read
twice a moment apart (a file still being written is a failed reload), an
empty or invalid file is a failed reload (``config.reload_failed``, old
state kept), widened security settings are logged loudly
(``config.widened``), keys that need a restart are named
(``config.restart_needed``) and the rest is applied live (``config.reloaded
applied=...``). SIGTERM and SIGINT stop gracefully at any moment (exit 0).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sds.bridge.metrics import Metrics

__all__ = ["add_arguments", "run"]

READ_SETTLE_SECONDS = 0.05  # a reloaded file is read twice this far apart
READ_ATTEMPTS = 3
LOOP_ERROR_LOG_INTERVAL = 10.0  # unexpected loop errors: one line per interval per kind


class _Stopped(Exception):
    """SIGTERM arrived before the event loop took over the signal."""


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
    parser.add_argument(
        "--metrics",
        metavar="IP:PORT",
        help="scrape listener: /metrics, /healthz, /readyz only; may bind any IP (default off)",
    )


def _raise_stopped(signum: int, frame: Any) -> None:
    raise _Stopped


def run(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415
    import signal  # noqa: PLC0415

    # Until the loop installs its handlers: SIGTERM stops cleanly, SIGHUP is not fatal.
    signal.signal(signal.SIGTERM, _raise_stopped)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        from sds.bridge.config import BridgeConfig, load_config  # noqa: PLC0415

        flags = {
            "workload_api": args.workload_api,
            "listen": args.listen,
            "admin": args.admin,
            "metrics": getattr(args, "metrics", None),
        }
        config = load_config(args.config) if args.config else BridgeConfig(source="flags")
        config = config.with_overrides(**flags)
        _require_listen(config)
        return asyncio.run(_main(config, args.config, flags))
    except (_Stopped, KeyboardInterrupt):
        return 0


def _require_listen(config: Any) -> None:
    from sds.errors import ConfigError  # noqa: PLC0415

    if config.listen is None:
        raise ConfigError("no SDS listen address: set listen in the config or pass --listen")


async def _main(config: Any, config_path: str | None, flags: dict[str, Any]) -> int:
    import asyncio  # noqa: PLC0415
    import logging  # noqa: PLC0415
    import signal  # noqa: PLC0415
    from dataclasses import replace  # noqa: PLC0415

    from sds._util.log import event  # noqa: PLC0415
    from sds._util.peercred import UnixListener  # noqa: PLC0415
    from sds.bridge.admin import AdminServer, Response  # noqa: PLC0415
    from sds.bridge.config import (  # noqa: PLC0415
        RESTART_KEYS,
        changed_keys,
        parse_config_text,
        read_config_bytes,
        widened_keys,
    )
    from sds.bridge.jwtsvids import JwtSvidManager, JwtToken, wanted_audiences  # noqa: PLC0415
    from sds.bridge.state import Bridge  # noqa: PLC0415
    from sds.errors import ConfigError, StartupError, WorkloadApiDenied  # noqa: PLC0415
    from sds.workloadapi.address import parse_address  # noqa: PLC0415
    from sds.workloadapi.client import WorkloadApiClient  # noqa: PLC0415
    from sds.workloadapi.watcher import Watcher  # noqa: PLC0415
    from sds.xds.service import AccessPolicy, SdsServer, SdsServicer  # noqa: PLC0415

    log = logging.getLogger("sds.run")
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_ThrottledLoopErrors(LOOP_ERROR_LOG_INTERVAL))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    listen = config.listen
    socket_path: str | None = listen.path
    if socket_path is not None:  # fail fast, before waiting for upstream
        _prepare_socket_dir(socket_path)
        _try_bind(socket_path, config.socket_mode)
    # prometheus_client (and the http.server it pulls in) only when something serves /metrics.
    metrics: Metrics | None = None
    if config.admin.port is not None or config.metrics is not None:
        from sds.bridge.metrics import Metrics  # noqa: PLC0415

        metrics = Metrics()
    addresses = [parse_address(a) for a in config.workload_api] or [parse_address(None)]
    backoff = config.upstream_backoff
    watchers = [
        Watcher(
            address,
            events=metrics.upstream(str(address)) if metrics is not None else None,
            backoff_initial=backoff.initial,
            backoff_max=backoff.max,
        )
        for address in addresses
    ]
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

    bridge.jwt = JwtSvidManager(
        fetch_jwt,
        bridge.refresh,
        spiffe_id=bridge.default_spiffe_id,
        wanted=lambda: wanted_audiences(info.names for info in servicer.streams.values()),
        retry_initial=backoff.initial,
        retry_max=backoff.max,
        max_audiences=config.jwt_svids.max_audiences,
        idle_timeout=config.jwt_svids.idle_timeout,
    )
    servicer = SdsServicer(
        bridge.cache,
        access=AccessPolicy(config.allowed_uids, config.allowed_gids),
        disable_spiffe_cert_validation=config.disable_spiffe_cert_validation,
        events=metrics,
        on_missing=bridge.demand,
    )

    def metrics_page() -> Response:
        body = metrics.render() if metrics is not None else b""
        return Response(200, body, "text/plain; version=0.0.4; charset=utf-8")

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
        return Response(503, f"not ready: {bridge.readiness_reason()}\n".encode() + detail)

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
    scrape = None
    server: SdsServer | None = None
    ours: UnixListener | None = None
    tasks: list[asyncio.Task[None]] = []
    reloads: set[asyncio.Task[None]] = set()
    try:
        if config.admin.port is not None:
            admin = AdminServer(
                config.admin.host,
                config.admin.port,
                {
                    "/healthz": lambda: Response(200, b"ok\n"),
                    "/readyz": readyz,
                    "/metrics": metrics_page,
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
                admin = None
                raise StartupError(
                    f"admin: cannot listen on {config.admin.host}:{config.admin.port}: "
                    f"{exc.strerror or exc}"
                ) from exc

        # The scrape listener: probes and metrics only, never /secrets, /envoys or JWKS,
        # so it may bind a pod IP; the admin endpoint above stays loopback-only.
        if config.metrics is not None:
            scrape = AdminServer(
                config.metrics.host,
                config.metrics.port,
                {
                    "/healthz": lambda: Response(200, b"ok\n"),
                    "/readyz": readyz,
                    "/metrics": metrics_page,
                },
                name="metrics",
            )
            try:
                await scrape.start()
            except OSError as exc:
                scrape = None
                raise StartupError(
                    f"metrics: cannot listen on {config.metrics.host}:{config.metrics.port}: "
                    f"{exc.strerror or exc}"
                ) from exc

        first = asyncio.Event()
        bridge.on_change(lambda: first.set() if bridge.serving else None)
        tasks = [asyncio.create_task(w.run(), name=f"watch-{i}") for i, w in enumerate(watchers)]
        reload_lock = asyncio.Lock()

        async def read_settled(path: str) -> bytes:
            """The file's bytes once two reads a moment apart agree (an editor may be writing)."""
            raw = read_config_bytes(path)
            for _ in range(READ_ATTEMPTS):
                await asyncio.sleep(READ_SETTLE_SECONDS)
                again = read_config_bytes(path)
                if again == raw:
                    return raw
                raw = again
            raise ConfigError(f"{path}: changed while being read (still being written?)")

        async def reload(path: str) -> None:
            async with reload_lock:
                running = bridge.config
                try:
                    fresh = parse_config_text(await read_settled(path), path)
                    fresh = fresh.with_overrides(**flags)
                    _require_listen(fresh)
                except ConfigError as exc:
                    event(
                        log,
                        logging.ERROR,
                        "config.reload_failed",
                        error=str(exc),
                        kept="previous",
                    )
                    return
                changed = changed_keys(running, fresh)
                restart = [k for k in changed if k in RESTART_KEYS]
                applied = [k for k in changed if k not in RESTART_KEYS]
                for key, old, new in widened_keys(running, fresh):
                    event(
                        log,
                        logging.WARNING,
                        "config.widened",
                        key=key,
                        old=old,
                        new=new,
                        applied="at restart" if key in RESTART_KEYS else "now",
                    )
                if restart:
                    event(
                        log,
                        logging.WARNING,
                        "config.restart_needed",
                        keys=",".join(restart),
                        detail="; ".join(
                            f"{k}: {_show(getattr(running, k))} -> {_show(getattr(fresh, k))}"
                            for k in restart
                        ),
                    )
                effective = replace(fresh, **{k: getattr(running, k) for k in RESTART_KEYS})
                servicer.access = AccessPolicy(effective.allowed_uids, effective.allowed_gids)
                servicer.disable_spiffe_cert_validation = effective.disable_spiffe_cert_validation
                bridge.reconfigure(effective)
                event(
                    log,
                    logging.INFO,
                    "config.reloaded",
                    source=path,
                    applied=",".join(applied) or "none",
                )

        def on_sighup() -> None:
            if stop.is_set():
                return
            if config_path is None:
                event(log, logging.WARNING, "config.reload_skipped", reason="no --config file")
                return
            task = asyncio.create_task(reload(config_path), name="reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)

        upstreams = ",".join(str(w.address) for w in watchers)
        event(log, logging.INFO, "bridge.starting", upstreams=upstreams)
        waiting = asyncio.create_task(first.wait())
        stopping = asyncio.create_task(stop.wait())
        try:
            while not first.is_set() and not stop.is_set():
                await asyncio.wait(
                    {waiting, stopping}, timeout=10, return_when=asyncio.FIRST_COMPLETED
                )
                if not first.is_set() and not stop.is_set():
                    event(
                        log,
                        logging.WARNING,
                        "bridge.waiting",
                        reason=bridge.readiness_reason() or "no valid X.509 SVID yet",
                    )
        finally:
            waiting.cancel()

        if not stop.is_set():
            server = SdsServer(servicer)
            try:
                if socket_path is not None:
                    _prepare_socket_dir(socket_path)
                    # probe (a live socket is refused), stale removal and bind via one dir fd
                    ours = _listen(socket_path, config.socket_mode)
                    await server.start(sock=ours.sock)
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
                server = None
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise StartupError(f"cannot listen on {listen}: {reason}") from exc
            event(
                log,
                logging.INFO,
                "sds.listening",
                address=str(listen),
                mode=f"{config.socket_mode:o}",
            )
            await stopping
        stopping.cancel()
        event(log, logging.INFO, "bridge.stopping")
    finally:
        await _shutdown(
            server=server,
            ours=ours,
            bridge=bridge,
            jwt_clients=list(jwt_clients.values()),
            tasks=tasks,
            reloads=reloads,
            admin=admin,
            scrape=scrape,
        )
    return 0


async def _shutdown(
    *,
    server: Any,
    ours: Any,
    bridge: Any,
    jwt_clients: list[Any],
    tasks: list[Any],
    reloads: set[Any],
    admin: Any,
    scrape: Any,
) -> None:
    """Stop everything that was started, in reverse order; remove only our own socket."""
    import asyncio  # noqa: PLC0415

    for task in reloads:
        task.cancel()
    if server is not None:
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)
    if ours is not None:
        ours.remove()  # only if the path is still the socket we bound
        ours.sock.close()
    if bridge.jwt is not None:
        await bridge.jwt.close()
    for jwt_client in jwt_clients:
        jwt_client.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, *reloads, return_exceptions=True)
    if admin is not None:
        await admin.close()
    if scrape is not None:
        await scrape.close()


def _show(value: Any) -> str:
    if value is None:
        return "off"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "none"
    if isinstance(value, int):
        return f"{value:04o}"
    if hasattr(value, "port") and hasattr(value, "host") and not hasattr(value, "path"):
        return "off" if value.port is None else f"{value.host}:{value.port}"
    return str(value)


def _listen(path: str, mode: int) -> Any:
    """:func:`sds._util.peercred.listen_unix`: probe (a live socket is refused), stale removal and
    bind, all through one directory fd; the refusal names the bridge's ``listen``."""
    from sds._util.peercred import listen_unix  # noqa: PLC0415
    from sds.errors import SocketInUse  # noqa: PLC0415

    try:
        return listen_unix(path, mode)
    except SocketInUse as exc:
        raise SocketInUse(
            f"{path}: another server is already listening there; "
            "stop it or choose another listen address"
        ) from exc


def _try_bind(path: str, mode: int) -> None:
    """A dry run of the bind at start: every refusal :func:`_listen` would give, now, not
    after the first SVID; the socket is closed and removed at once (no accept ever ran)."""
    listener = _listen(path, mode)
    listener.remove()
    listener.sock.close()


def _prepare_socket_dir(path: str) -> None:
    """Create the socket's directory 0700 if missing; refuse one another user could swap files in
    (the rule of :func:`sds._util.peercred.check_socket_dir`, checked again when binding)."""
    from sds._util.peercred import check_socket_dir  # noqa: PLC0415
    from sds.errors import StartupError  # noqa: PLC0415

    directory = os.path.dirname(path) or "/"
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StartupError(
            f"socket directory {directory}: cannot create: {exc.strerror or exc}"
        ) from exc
    try:
        check_socket_dir(fd, directory)
    finally:
        os.close(fd)


class _ThrottledLoopErrors:
    """The loop's exception handler: one line per kind of error per interval, no tracebacks.

    asyncio reports accept() failures (EMFILE) this way for every attempt; logged
    whole, a descriptor flood becomes a log flood.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, loop: Any, context: dict[str, Any]) -> None:
        import logging  # noqa: PLC0415
        import time  # noqa: PLC0415

        from sds._util.log import event  # noqa: PLC0415

        exc = context.get("exception")
        message = str(context.get("message", "unexpected error"))
        kind = f"{message[:80]}|{type(exc).__name__ if exc else ''}"
        now = time.monotonic()
        if now - self._last.get(kind, -float("inf")) < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        fields: dict[str, Any] = {"message": message[:200]}
        if exc is not None:
            fields["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        event(logging.getLogger("sds.run"), logging.ERROR, "loop.error", **fields)
