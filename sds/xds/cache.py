"""One in-memory secret state, versioned, with one coalescing signal per subscribed stream.

Modelled on go-control-plane's linear cache: the cache holds only the latest
secrets; a stream holds a :class:`Watch` (its subscribed names and one
``asyncio.Event``). An update sets the event of every watch subscribed to a
changed name; the stream then reads the *latest* state, so bursts coalesce
and per-stream memory is bounded. Rendered bytes are memoized per
(name, content digest, variant), so each version is serialized once and the
bytes are shared by every stream.

Versions are opaque strings prefixed with a random instance id, so a
restarted bridge never reuses one: a resource's version is
``<instance>-<content digest>``; the state's version is ``<instance>-<seq>``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sds.xds.codec import render_secret
from sds.xds.resources import SecretSpec, TlsSpec

__all__ = ["SecretCache", "Watch"]


@dataclass(eq=False)
class Watch:
    """A stream's subscription: names (None = every secret) and its coalescing signal."""

    names: frozenset[str] | None
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def wants(self, changed: Iterable[str]) -> bool:
        """Whether any of ``changed`` is subscribed."""
        if self.names is None:
            return True
        return not self.names.isdisjoint(changed)


class SecretCache:
    """The latest secrets by name, their versions, and the watches to notify."""

    def __init__(self, instance_id: str | None = None) -> None:
        self.instance_id = instance_id or secrets.token_hex(4)
        self._specs: dict[str, SecretSpec] = {}
        self._versions: dict[str, str] = {}
        self._seq = 0
        self._rendered: dict[tuple[str, str, bool], bytes] = {}
        self._watches: set[Watch] = set()
        self.updated_at = time.monotonic()
        #: Why this cache serves no more (set by :meth:`close`); streams on it end.
        self.closed: str | None = None

    @property
    def version(self) -> str:
        """The state's version: changes whenever any secret changes."""
        return f"{self.instance_id}-{self._seq}"

    def names(self) -> list[str]:
        """Every name that can be served now."""
        return sorted(self._specs)

    def spec(self, name: str) -> SecretSpec | None:
        """The current content of ``name``, or None."""
        return self._specs.get(name)

    def resource_version(self, name: str) -> str | None:
        """The opaque version of ``name``'s current content, or None if not served."""
        return self._versions.get(name)

    def ready(self) -> bool:
        """At least one TLS certificate is being served."""
        return any(isinstance(spec, TlsSpec) for spec in self._specs.values())

    def update(self, specs: Mapping[str, SecretSpec]) -> set[str]:
        """Replace the state; notify watches of changed names; return those names."""
        versions = {name: f"{self.instance_id}-{spec.digest()}" for name, spec in specs.items()}
        changed = {
            name
            for name in versions.keys() | self._versions.keys()
            if versions.get(name) != self._versions.get(name)
        }
        if not changed:
            return changed
        self._specs = dict(specs)
        self._versions = versions
        self._seq += 1
        self.updated_at = time.monotonic()
        live = {(name, version) for name, version in versions.items()}
        self._rendered = {k: v for k, v in self._rendered.items() if (k[0], k[1]) in live}
        for watch in self._watches:
            if watch.wants(changed):
                watch.event.set()
        return changed

    def render(self, name: str, *, trusted_ca: bool) -> bytes | None:
        """Serialized ``Secret`` bytes for ``name`` (memoized, shared by every stream), or None
        if not served."""
        version = self._versions.get(name)
        if version is None:
            return None
        key = (name, version, trusted_ca)
        cached = self._rendered.get(key)
        if cached is None:
            cached = render_secret(name, self._specs[name], trusted_ca=trusted_ca)
            self._rendered[key] = cached
        return cached

    def close(self, reason: str) -> None:
        """Serve nothing more: drop every secret and wake every watch, so each stream sees
        :attr:`closed` and ends with ``reason``."""
        self.closed = reason
        self._specs, self._versions, self._rendered = {}, {}, {}
        self._seq += 1
        for watch in self._watches:
            watch.event.set()

    def watch(self, names: frozenset[str] | None) -> Watch:
        """Register a watch; the caller must :meth:`cancel` it when its stream ends."""
        watch = Watch(names)
        self._watches.add(watch)
        return watch

    def cancel(self, watch: Watch) -> None:
        """Forget ``watch``."""
        self._watches.discard(watch)

    @property
    def watch_count(self) -> int:
        """How many streams are subscribed."""
        return len(self._watches)
