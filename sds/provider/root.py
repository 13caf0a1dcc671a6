"""The composition root of ``sds workload-api``: serves the provider, owns its tasks, stops it.

:class:`ProviderApp` reads top to bottom as its life: :meth:`ProviderApp.run`
binds the socket, starts the Workload API server, then (with an admin socket)
binds that and starts the Delegated Identity API (:mod:`sds.provider.delegated`),
then the SIGHUP reloader,
serves until SIGTERM or SIGINT, then stops and returns the exit code.

Ownership: the long-running tasks (the SIGHUP reloader) run in one
:class:`asyncio.TaskGroup` held by the app; grpclib's server owns its call
handlers, and the app owns the server.

Policy for an unexpected exception in a long-running task (a bug), the same as
``sds run``'s (:mod:`sds.bridge.root`): it is logged once, with its
traceback, as ``task.crashed task=NAME error=... exc=...``, and the provider
stops in the order below and exits 1, so its supervisor restarts it with the
same CA (``--state-dir``) in milliseconds; a provider whose reloads are dead
would serve a configuration nobody can change any more. Expected failures
never reach it: a call's error is the caller's (a gRPC status), and an
identities or federation file that does not load, whatever the exception, is a
failed reload (``provider.reload_failed``) that keeps the previous configuration.
A reload applies to both APIs at once: the admin API reads the Workload API
service's configuration.

Shutdown, in order, on SIGTERM or SIGINT (exit 0) and after a crash (exit 1):

1. stop the reloader;
2. the admin API (if any): end its streams with UNAVAILABLE, close its
   connections, remove its socket if still ours;
3. end every open stream with UNAVAILABLE ("shutting down") so clients retry,
   stop accepting and close every connection (up to 5 s);
4. remove the socket, only if it is still the one this process bound;
5. log ``provider.stopped``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

from sds._util.log import event
from sds._util.peercred import listen_unix
from sds._util.tasks import TaskOwner, each_time
from sds.errors import ConfigError
from sds.provider.delegated import AdminApi
from sds.provider.identities import load_federation, load_identities
from sds.provider.service import WorkloadApiProvider

__all__ = ["ProviderApp"]

logger = logging.getLogger("sds.provider")

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class ProviderApp:
    """``sds workload-api`` as one object: the provider on ``socket`` and the tasks around it.

    ``identities`` and ``federate`` are what the command line named (a file or
    directory, ``TD=FILE`` pairs); SIGHUP loads them again. ``admin`` is served on
    ``admin_socket`` (mode ``admin_mode``) when both are given.
    """

    def __init__(
        self,
        provider: WorkloadApiProvider,
        *,
        socket: str,
        mode: int,
        identities: Path,
        federate: Sequence[str],
        admin: AdminApi | None = None,
        admin_socket: str | None = None,
        admin_mode: int = 0o600,
    ) -> None:
        if (admin is None) != (admin_socket is None):
            raise ValueError("admin and admin_socket go together")
        self.provider = provider
        self.admin = admin
        self.admin_socket = admin_socket
        self.admin_mode = admin_mode
        self.socket = socket
        self.mode = mode
        self.identities = identities
        self.federate = list(federate)
        self._stop = asyncio.Event()
        self.tasks = TaskOwner(
            logger, self._stop.set, "stopping; exit 1 for the supervisor to restart the provider"
        )
        self._reloader: asyncio.Task[None] | None = None
        self._hup = asyncio.Event()  # a reload was asked for

    # -- the life of the process --------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT or a crashed task, then stop in order; the exit code.

        A start-up failure (the socket cannot be bound) is raised once the signal
        handlers are removed again.
        """
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._hup.set)  # SIGHUPs coalesce
        try:
            code = await self.tasks.run(self._live, self.stop)
        finally:
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)
        event(logger, logging.INFO, "provider.stopped", socket=self.socket)
        return code

    async def _live(self) -> None:
        await self.start()
        await self._stop.wait()

    async def start(self) -> None:
        """Bind the socket, serve the Workload API on it, then the admin API, start the reloader.

        If the admin socket cannot be bound, the Workload API is closed again before
        the error is raised.
        """
        listener = listen_unix(self.socket, self.mode)
        try:
            await self.provider.start(listener)
        except BaseException:
            listener.remove()
            listener.sock.close()
            raise
        if self.admin is not None and self.admin_socket is not None:
            try:
                admin_listener = listen_unix(self.admin_socket, self.admin_mode)
            except BaseException:
                await self.provider.close()
                raise
            try:
                await self.admin.start(admin_listener)
            except BaseException:
                admin_listener.remove()
                admin_listener.sock.close()
                await self.provider.close()
                raise
        self._reloader = self.tasks.spawn("reload", each_time(self._hup, self._reload))
        event(
            logger,
            logging.INFO,
            "provider.ready",
            socket=self.socket,
            trust_domain=self.provider.trust_domain,
            identities=len(self.provider.identities),
            federated=len(self.provider.federation),
            socket_mode=f"{self.mode:o}",
        )
        if self.admin is not None:
            event(
                logger,
                logging.INFO,
                "provider.admin_ready",
                admin_socket=self.admin_socket,
                delegates=",".join(sorted(str(d) for d in self.admin.service.delegates)) or "-",
                socket_mode=f"{self.admin_mode:o}",
            )

    async def stop(self) -> None:
        """Stop what was started, in the order of the module docstring."""
        self._stop.set()
        await self.tasks.cancel(self._reloader)
        if self.admin is not None:
            await self.admin.close()  # delegates' streams end UNAVAILABLE; removes its socket
        await self.provider.close()  # streams end UNAVAILABLE; removes the socket if ours
        await self.tasks.cancel()  # the owner cancels the rest: nothing outlives the app

    # -- SIGHUP -------------------------------------------------------------------------------

    async def _reload(self) -> None:
        self.reload()

    def reload(self) -> None:
        """Load the identities and federation files again and swap them in; a file that does
        not load is one logged line and the previous configuration stays."""
        trust_domain = self.provider.trust_domain
        try:
            identities = load_identities(self.identities, trust_domain)
            federation = load_federation(self.federate, trust_domain)
        except ConfigError as exc:
            event(logger, logging.ERROR, "provider.reload_failed", error=str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - policy: input that does not load is a failed reload
            event(
                logger,
                logging.ERROR,
                "provider.reload_failed",
                error=f"unexpected {type(exc).__name__}: {exc}",
            )
            return
        self.provider.reload(identities, federation)
        event(
            logger,
            logging.INFO,
            "provider.reloaded",
            identities=len(identities),
            federated=len(federation),
        )
