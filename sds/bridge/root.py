"""The composition root of ``sds run``: builds the bridge, owns every task, stops it in order.

:class:`BridgeApp` reads top to bottom as its life. ``__init__`` wires the
parts and does no I/O; :meth:`BridgeApp.run` starts them, serves until a stop
is asked, stops them and returns the exit code.

Start-up, in order (Envoy and Istio probe the socket):

1. the SDS socket's directory is checked and a dry-run bind refuses a socket
   something still accepts on (:meth:`BridgeApp.main`, before anything else;
   every start-up failure is one line and exit 2);
2. the admin endpoint and the metrics listener bind: ``/readyz`` says 503 with
   a reason;
3. the upstream watchers start, and SIGHUP reloads the config file;
4. once the first valid X.509 context has arrived the SDS socket is bound, so
   anything that finds the socket can get secrets.

In per-caller mode (``per_caller`` in the config) step 3 starts one bundle
watch per Delegated Identity API instead (:class:`~sds.bridge.callers.Callers`),
and step 4 waits until every one of them has accepted the bridge as a
delegate; each SDS stream then starts (or shares) its own caller's
subscriptions, owned by the same task group and ended with the caller.

Ownership: every long-running task (one watcher per upstream, each JWT-SVID
refresh and the JWT reaper, the admin and metrics accept loops, the SIGHUP
reloader) runs in one :class:`asyncio.TaskGroup` held by the app, so nothing
runs unowned and leaving the group ends them all. The servers own their
per-connection work, as grpclib's server owns its stream handlers; the app owns
the servers.

Policy for an unexpected exception in a long-running task (a bug): it is
logged once, with its traceback, as ``task.crashed task=NAME error=...
exc=...``, and the bridge stops in the order below and exits 1, so its
supervisor (kubelet, systemd) restarts it. A task that returns on its own
counts the same. Why: a bridge with a dead watcher would go on serving what it
last had while ``/readyz`` said ready; a half-dead sidecar whose health lies is
worse than a restart, and a restarted bridge has the current state from the
Workload API again in milliseconds. Expected failures never reach this policy:
an unavailable, denying or misconfigured Workload API and failed JWT-SVID
fetches are retried with backoff where they happen, keeping the last good state;
a bad config file on SIGHUP is a failed reload (``config.reload_failed``).

Shutdown, in order, on SIGTERM or SIGINT (exit 0) and after a crash (exit 1):

1. stop accepting SDS connections and end the open streams (up to 5 s);
2. remove the SDS socket, only if it is still the one this process bound;
3. stop the reloader (a reload in progress is abandoned: it only reads);
4. end every attested caller (per-caller mode), stop JWT-SVID refresh and close the
   JWT-SVID clients;
5. stop the upstream watchers, closing their Workload API connections;
6. close the admin endpoint and the metrics listener last, so probes answer
   (``/readyz``: 503 once nothing is served) until the end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from sds._util.log import event
from sds._util.peercred import UnixListener, check_socket_dir, listen_unix
from sds._util.tasks import TaskOwner, each_time
from sds.bridge.admin import AdminServer
from sds.bridge.config import (
    RESTART_KEYS,
    BridgeConfig,
    changed_keys,
    parse_config_text,
    read_config_bytes,
    widened_keys,
)
from sds.bridge.jwtsvids import JwtSvidManager, JwtToken, wanted_audiences
from sds.bridge.state import Bridge
from sds.bridge.views import BridgeViews
from sds.errors import ConfigError, SocketInUse, StartupError, WorkloadApiDenied
from sds.workloadapi.address import parse_address
from sds.workloadapi.client import WorkloadApiClient
from sds.workloadapi.watcher import Watcher
from sds.xds.cache import SecretCache
from sds.xds.service import AccessPolicy, SdsServer, SdsServicer

if TYPE_CHECKING:
    from sds.bridge.callers import Callers
    from sds.bridge.metrics import Metrics

__all__ = ["BridgeApp", "require_listen"]

log = logging.getLogger("sds.run")

READ_SETTLE_SECONDS = 0.05  # a reloaded file is read twice this far apart
READ_ATTEMPTS = 3
LOOP_ERROR_LOG_INTERVAL = 10.0  # unexpected loop errors: one line per interval per kind
WAITING_LOG_INTERVAL = 10.0  # "bridge.waiting" while no SVID has arrived
SDS_CLOSE_TIMEOUT = 5.0


class BridgeApp:
    """``sds run`` as one object: the parts of one bridge and the tasks that drive them."""

    def __init__(
        self, config: BridgeConfig, config_path: str | None, flags: dict[str, Any]
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.flags = flags  # command-line values, re-applied over the file on every reload
        self.tasks = TaskOwner(
            log, self._request_stop, "stopping; exit 1 for the supervisor to restart the bridge"
        )
        self._stop = asyncio.Event()
        # The start-up gate: the first servable X.509 context arrived, or a stop was asked.
        self._gate = asyncio.Event()
        self._hup = asyncio.Event()  # a reload was asked for
        # prometheus_client (and the http.server it pulls in) only when something serves /metrics.
        self.metrics: Metrics | None = None
        if config.admin.port is not None or config.metrics is not None:
            from sds.bridge.metrics import Metrics  # noqa: PLC0415

            self.metrics = Metrics()
        metrics = self.metrics
        backoff = config.upstream_backoff
        access = AccessPolicy(config.allowed_uids, config.allowed_gids)
        self.watchers: list[Watcher] = []
        self.jwt_clients: list[WorkloadApiClient] = []  # one per watcher, in order
        self.bridge: Bridge | None = None  # the bridge's own identity (not in per-caller mode)
        self.callers: Callers | None = None  # per-caller mode: one view per attested caller
        if config.per_caller is not None:
            from sds.bridge.callers import Callers  # noqa: PLC0415 - only in this mode

            cache = SecretCache()
            self.callers = Callers(
                config,
                [parse_address(a) for a in config.per_caller.delegated_identity_api],
                self.tasks.spawn,
                instance_id=cache.instance_id,
                on_change=self._callers_changed,
            )
            self.state: Bridge | Callers = self.callers
            self.servicer = SdsServicer(
                cache,
                tenancy=self.callers,
                access=access,
                disable_spiffe_cert_validation=config.disable_spiffe_cert_validation,
                events=metrics,
            )
            self.callers.streams = self.servicer.streams.values
            if metrics is not None:
                metrics.watch_callers(self.callers.states)
        else:
            addresses = [parse_address(a) for a in config.workload_api] or [parse_address(None)]
            self.watchers = [
                Watcher(
                    address,
                    events=metrics.upstream(str(address)) if metrics is not None else None,
                    backoff_initial=backoff.initial,
                    backoff_max=backoff.max,
                )
                for address in addresses
            ]
            bridge = self.state = self.bridge = Bridge(config, self.watchers, metrics=metrics)
            self.jwt_clients = [WorkloadApiClient(w.address) for w in self.watchers]
            self.servicer = SdsServicer(
                bridge.cache,
                access=access,
                disable_spiffe_cert_validation=config.disable_spiffe_cert_validation,
                events=metrics,
                on_missing=bridge.demand,
            )
            bridge.jwt = JwtSvidManager(
                self._fetch_jwt,
                bridge.refresh,
                spiffe_id=bridge.default_spiffe_id,
                wanted=lambda: wanted_audiences(i.names for i in self.servicer.streams.values()),
                retry_initial=backoff.initial,
                retry_max=backoff.max,
                max_audiences=config.jwt_svids.max_audiences,
                idle_timeout=config.jwt_svids.idle_timeout,
                spawn=self.tasks.spawn,
            )
        self.views = BridgeViews(self.state, self.watchers, self.servicer, metrics)
        self.admin: AdminServer | None = None
        self.scrape: AdminServer | None = None  # the metrics listener
        self.server: SdsServer | None = None
        self.socket: UnixListener | None = None  # the bound SDS socket, ours to remove
        self._watching: list[asyncio.Task[None]] = []
        self._reloader: asyncio.Task[None] | None = None

    # -- the life of the process --------------------------------------------------------------

    @classmethod
    async def main(
        cls, config: BridgeConfig, config_path: str | None, flags: dict[str, Any]
    ) -> int:
        """Check the socket path, build the app on the running loop and run it; the exit code.

        The socket path is checked first, before any upstream address is read, so
        its refusal is the one reported (fail fast, before waiting for upstream).
        """
        listen = config.listen
        if listen is not None and listen.path is not None:
            _prepare_socket_dir(listen.path)
            _try_bind(listen.path, config.socket_mode)
        return await cls(config, config_path, flags).run()

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT or a crashed task, stop in order; the exit code.

        A start-up failure is raised (as :class:`sds.errors.StartupError` and kin)
        after what was started is stopped again.
        """
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_ThrottledLoopErrors(LOOP_ERROR_LOG_INTERVAL))
        loop.add_signal_handler(signal.SIGTERM, self._request_stop)
        loop.add_signal_handler(signal.SIGINT, self._request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        return await self.tasks.run(self._live, self.stop)

    async def _live(self) -> None:
        await self.start()
        await self.serve()
        event(log, logging.INFO, "bridge.stopping", exit_code=self.tasks.exit_code)

    async def start(self) -> None:
        """Bind the admin and metrics listeners, start the watchers and the reloader."""
        if self.config.admin.port is not None:
            routes, prefixes = self.views.admin_routes()
            self.admin = AdminServer(
                self.config.admin.host, self.config.admin.port, routes, prefixes
            )
            self._bind_listener(self.admin, "admin", self.config.admin.host, self.config.admin.port)
        # The scrape listener: probes and metrics only, never /secrets, /envoys or JWKS,
        # so it may bind a pod IP; the admin endpoint above stays loopback-only.
        if self.config.metrics is not None:
            host, port = self.config.metrics.host, self.config.metrics.port
            self.scrape = AdminServer(host, port, self.views.scrape_routes(), name="metrics")
            self._bind_listener(self.scrape, "metrics", host, port)
        if self.bridge is not None:
            self.bridge.on_change(self._check_gate)
        if self.callers is not None:
            self.callers.start()
        self._watching = [
            self.tasks.spawn(f"watch-{i}", watcher.run()) for i, watcher in enumerate(self.watchers)
        ]
        if self.config_path is not None:
            path = self.config_path
            self._reloader = self.tasks.spawn(
                "reload", each_time(self._hup, lambda: self.reload(path))
            )
        if self.callers is not None:
            upstreams = ",".join(str(a) for a in self.callers.addresses)
            event(log, logging.INFO, "bridge.starting", mode="per_caller", upstreams=upstreams)
        else:
            upstreams = ",".join(str(w.address) for w in self.watchers)
            event(log, logging.INFO, "bridge.starting", upstreams=upstreams)

    def _callers_changed(self) -> None:
        """Per-caller mode: a Delegated Identity API's bundles or connection changed."""
        callers = self.callers
        assert callers is not None
        if self.metrics is not None:
            self.metrics.ready.set(1 if callers.ready else 0)
            for address, bundles in zip(callers.addresses, callers.bundles, strict=True):
                self.metrics.upstream_connected.labels(str(address)).set(int(bundles.connected))
        self._check_gate()

    def _check_gate(self) -> None:
        """Open the start-up gate once something can be served: the bridge's first valid
        SVID, or (per-caller mode) every Delegated Identity API accepting us as a delegate."""
        if self.state.serving:
            self._gate.set()

    async def serve(self) -> None:
        """Wait for the first servable X.509 context, bind the SDS socket, serve until stopped."""
        await self._first_context()
        if self._stop.is_set():
            return
        listen = self.config.listen
        assert listen is not None  # require_listen() ran before
        server = SdsServer(self.servicer)
        try:
            if listen.path is not None:
                _prepare_socket_dir(listen.path)
                # probe (a live socket is refused), stale removal and bind via one dir fd
                self.socket = _listen(listen.path, self.config.socket_mode)
                await server.start(sock=self.socket.sock)
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
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise StartupError(f"cannot listen on {listen}: {reason}") from exc
        self.server = server
        event(
            log,
            logging.INFO,
            "sds.listening",
            address=str(listen),
            mode=f"{self.config.socket_mode:o}",
        )
        await self._stop.wait()

    async def stop(self) -> None:
        """Stop everything that was started, in the order of the module docstring."""
        self._request_stop()
        server, self.server = self.server, None
        if server is not None:
            server.close()
            try:
                await asyncio.wait_for(server.wait_closed(), SDS_CLOSE_TIMEOUT)
            except TimeoutError:
                event(log, logging.WARNING, "sds.close_timeout", seconds=SDS_CLOSE_TIMEOUT)
        sock, self.socket = self.socket, None
        if sock is not None:
            sock.remove()  # only if the path is still the socket we bound
            sock.sock.close()
        await self.tasks.cancel(self._reloader)
        if self.callers is not None:
            self.callers.close()
        if self.bridge is not None and self.bridge.jwt is not None:
            await self.bridge.jwt.close()
        for jwt_client in self.jwt_clients:
            jwt_client.close()
        await self.tasks.cancel(*self._watching)
        for listener in (self.admin, self.scrape):
            if listener is not None:
                await listener.close()
        await self.tasks.cancel()  # the owner cancels the rest: nothing outlives the app

    def _request_stop(self) -> None:
        self._stop.set()
        self._gate.set()

    # -- start-up -----------------------------------------------------------------------------

    def _bind_listener(self, server: AdminServer, what: str, host: str, port: int) -> None:
        try:
            server.bind()
        except OSError as exc:
            raise StartupError(
                f"{what}: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        self.tasks.spawn(f"{what}-accept", server.serve())  # ended by server.close()

    async def _first_context(self) -> None:
        """Wait until the start-up gate opens, saying every ``WAITING_LOG_INTERVAL`` seconds
        why it has not yet."""
        while not self._gate.is_set():
            try:
                async with asyncio.timeout(WAITING_LOG_INTERVAL):
                    await self._gate.wait()
            except TimeoutError:
                event(
                    log,
                    logging.WARNING,
                    "bridge.waiting",
                    reason=self.state.readiness_reason() or "no valid X.509 SVID yet",
                )

    async def _fetch_jwt(self, audience: str, spiffe_id: str | None) -> JwtToken:
        """A JWT-SVID from the upstream serving that identity's X.509-SVID (the one that is up)."""
        assert self.bridge is not None  # JWT-SVIDs of the bridge's own identity
        jwt_client = self.jwt_clients[self.bridge.serving_source(spiffe_id)]
        svids = await jwt_client.fetch_jwt_svids([audience], spiffe_id)
        if not svids:
            raise WorkloadApiDenied(f"no JWT-SVID issued for audience {audience!r}")
        svid = svids[0]
        return JwtToken(svid.token, str(svid.spiffe_id), svid.expiry.timestamp())

    # -- SIGHUP -------------------------------------------------------------------------------

    def _on_sighup(self) -> None:
        if self._stop.is_set():
            return
        if self.config_path is None:
            event(log, logging.WARNING, "config.reload_skipped", reason="no --config file")
            return
        self._hup.set()  # SIGHUPs during a reload coalesce into one more

    async def reload(self, path: str) -> None:
        """Re-read the config file and apply what may change live; log what needs a restart."""
        running = self.state.config
        try:
            fresh = parse_config_text(await _read_settled(path), path)
            fresh = fresh.with_overrides(**self.flags)
            require_listen(fresh)
        except ConfigError as exc:
            event(log, logging.ERROR, "config.reload_failed", error=str(exc), kept="previous")
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
        self.servicer.access = AccessPolicy(effective.allowed_uids, effective.allowed_gids)
        self.servicer.disable_spiffe_cert_validation = effective.disable_spiffe_cert_validation
        self.state.reconfigure(effective)
        event(
            log,
            logging.INFO,
            "config.reloaded",
            source=path,
            applied=",".join(applied) or "none",
        )


def require_listen(config: BridgeConfig) -> None:
    """Refuse a configuration without an SDS listen address (flags or file)."""
    if config.listen is None:
        raise ConfigError("no SDS listen address: set listen in the config or pass --listen")


async def _read_settled(path: str) -> bytes:
    """The file's bytes once two reads a moment apart agree (an editor may be writing)."""
    raw = read_config_bytes(path)
    for _ in range(READ_ATTEMPTS):
        await asyncio.sleep(READ_SETTLE_SECONDS)
        again = read_config_bytes(path)
        if again == raw:
            return raw
        raw = again
    raise ConfigError(f"{path}: changed while being read (still being written?)")


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


def _listen(path: str, mode: int) -> UnixListener:
    """:func:`sds._util.peercred.listen_unix`: probe (a live socket is refused), stale removal and
    bind, all through one directory fd; the refusal names the bridge's ``listen``."""
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
    whole, a descriptor flood becomes a log flood. Errors of the app's own tasks
    never come here: :class:`BridgeApp` logs those as ``task.crashed``.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, loop: Any, context: dict[str, Any]) -> None:
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
        event(log, logging.ERROR, "loop.error", **fields)
