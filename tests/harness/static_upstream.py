"""A static in-process upstream for the bridge: fixed material, swapped by the test."""

from __future__ import annotations

from collections.abc import Callable

from sds.spiffe.x509 import X509Context


class StaticSource:
    """An UpstreamSource holding fixed material; set() swaps it and notifies."""

    address = "static"
    connected = True

    def __init__(self, ctx: X509Context | None) -> None:
        self.ctx = ctx
        self._callbacks: list[Callable[[], None]] = []

    def current(self) -> X509Context | None:
        return self.ctx

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def set(self, ctx: X509Context | None) -> None:
        self.ctx = ctx
        for callback in self._callbacks:
            callback()
