"""The ``sds run`` configuration: a YAML file checked strictly at load time.

Every key is documented in ``docs/configuration.md``. An unknown key, a value
of the wrong type or a bad SPIFFE ID raises ConfigError with one line naming
the file and the key path (``sds.yaml: policies[0].allow[1]: ...``). Reading
is hostile-input safe: only a regular file of at most ``MAX_CONFIG_BYTES`` is
read (a FIFO never blocks), it must be UTF-8, YAML dates stay strings,
duplicate keys, oversized integers and deep nesting are refused, and an empty
or comment-only file is an error (an editor's half-written file must never
read as "no restrictions").
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from sds._util.files import os_reason, read_regular_file
from sds._util.strictyaml import Invalid, Reader
from sds._util.text import has_control
from sds.bridge.upstreams import FailoverPolicy
from sds.errors import ConfigError, InvalidSpiffeId
from sds.spiffe.id import SpiffeId, TrustDomain
from sds.spiffe.match import WILDCARD_RULE, IdPattern
from sds.workloadapi.address import parse_address, unix_socket_path

__all__ = [
    "AdminConfig",
    "BridgeConfig",
    "JwtLimits",
    "ListenAddress",
    "MetricsConfig",
    "NamedSecret",
    "Names",
    "Policy",
    "SvidSelector",
    "UpstreamBackoff",
    "changed_keys",
    "load_config",
    "parse_config",
    "parse_config_text",
    "parse_listen",
    "read_config_bytes",
    "widened_keys",
]

MAX_CONFIG_BYTES = 1 << 20  # a config file larger than this is refused
MAX_DEPTH = 32  # nesting deeper than this is refused (RecursionError otherwise)
MAX_INT_DIGITS = 20  # integers with more digits are refused (uids, modes, ports)


@dataclass(frozen=True, slots=True)
class SvidSelector:
    """Chooses one SVID by SPIFFE ID and/or hint (both given: both must match)."""

    spiffe_id: str | None = None
    hint: str | None = None

    def describe(self) -> str:
        parts = []
        if self.spiffe_id is not None:
            parts.append(f"spiffe_id={self.spiffe_id}")
        if self.hint is not None:
            parts.append(f"hint={self.hint}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class NamedSecret:
    """A TLS certificate served under ``name``, chosen by a selector."""

    name: str
    selector: SvidSelector


@dataclass(frozen=True, slots=True)
class Policy:
    """A validation context that trusts ``trust_domains`` and admits only ``allow``ed peers.

    ``allow`` entries are exact SPIFFE IDs or prefixes written ``spiffe://td/path/*``
    (any ID strictly below ``/path``). Empty ``trust_domains`` means the own
    trust domain. ``workloads`` (same syntax) limits the policy to workloads
    whose default SVID has a matching SPIFFE ID; empty: every workload. One
    name may be given several times with different ``workloads``: a workload
    gets the first entry that applies to it (:meth:`BridgeConfig.policies_for`).
    """

    name: str
    trust_domains: tuple[TrustDomain, ...]
    exact: tuple[str, ...]
    prefixes: tuple[str, ...]
    workloads: tuple[IdPattern, ...] = ()

    def applies_to(self, spiffe_id: str | None) -> bool:
        """Whether a workload whose default SVID is ``spiffe_id`` (None: none yet) gets it."""
        if not self.workloads:
            return True
        return spiffe_id is not None and any(p.matches(spiffe_id) for p in self.workloads)

    @property
    def allow_text(self) -> str:
        """The allow list as written (prefixes with their ``*``), comma-separated."""
        return ",".join(self.exact + tuple(p + "*" for p in self.prefixes))

    @property
    def scope(self) -> str:
        """Which workloads it applies to, for messages: ``every workload`` or the patterns."""
        return ",".join(str(p) for p in self.workloads) or "every workload"


#: ``per_caller.max_callers`` by default.
DEFAULT_MAX_CALLERS = 1024


@dataclass(frozen=True, slots=True)
class PerCaller:
    """Per-caller attestation: each SDS caller gets only its own workload's SVIDs.

    The bridge attests every SDS stream by the caller's kernel pid (held by a
    pidfd) and subscribes on its behalf to a Delegated Identity API (SPIRE
    agent's admin socket, or ``sds workload-api --admin-socket``), one
    address or several redundant ones. The bridge serves no identity of its own.
    """

    delegated_identity_api: tuple[str, ...]
    #: Caller processes attested at once; a new one beyond is refused (RESOURCE_EXHAUSTED).
    max_callers: int = DEFAULT_MAX_CALLERS


@dataclass(frozen=True, slots=True)
class Names:
    """Resource names of the built-in secrets (SPIRE's defaults)."""

    default_svid: str = "default"
    own_bundle: str = "ROOTCA"
    all_bundles: str = "ALL"


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where the SDS server listens: a Unix socket path, or loopback TCP."""

    path: str | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix://{self.path}"
        return f"tcp://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The loopback HTTP endpoint for /healthz, /readyz and /metrics (port 0 = any)."""

    host: str = "127.0.0.1"
    port: int | None = 8181


@dataclass(frozen=True, slots=True)
class UpstreamBackoff:
    """Reconnect delays to the Workload API: full jitter, doubling from ``initial`` to ``max``."""

    initial: float = 0.1
    max: float = 5.0


@dataclass(frozen=True, slots=True)
class JwtLimits:
    """Bounds on the JWT-SVID audiences the bridge fetches and refreshes for Envoy."""

    max_audiences: int = 64
    idle_timeout: float = 600.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The scrape listener: /metrics, /healthz and /readyz only, on any IP (port 0 = any).

    It serves nothing about secrets or Envoys, so unlike the admin endpoint it
    may bind a pod IP or ``0.0.0.0`` for Prometheus and kubelet probes.
    """

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """Everything ``sds run`` needs, validated."""

    workload_api: tuple[str, ...] = ()
    listen: ListenAddress | None = None
    socket_mode: int = 0o600
    allowed_uids: frozenset[int] = frozenset()
    allowed_gids: frozenset[int] = frozenset()
    names: Names = field(default_factory=Names)
    default_svid: SvidSelector | None = None
    trust_domain: TrustDomain | None = None
    disable_spiffe_cert_validation: bool = False
    secrets: tuple[NamedSecret, ...] = ()
    policies: tuple[Policy, ...] = ()
    admin: AdminConfig = field(default_factory=AdminConfig)
    failover: FailoverPolicy = field(default_factory=FailoverPolicy)
    upstream_backoff: UpstreamBackoff = field(default_factory=UpstreamBackoff)
    jwt_svids: JwtLimits = field(default_factory=JwtLimits)
    metrics: MetricsConfig | None = None
    per_caller: PerCaller | None = None
    source: str = "<defaults>"

    def policies_for(self, spiffe_id: str | None) -> tuple[Policy, ...]:
        """The policies a workload whose default SVID is ``spiffe_id`` gets: per name, the
        first entry that applies to it (see :attr:`Policy.workloads`)."""
        chosen: dict[str, Policy] = {}
        for policy in self.policies:
            if policy.name not in chosen and policy.applies_to(spiffe_id):
                chosen[policy.name] = policy
        return tuple(chosen.values())

    def with_overrides(
        self,
        *,
        workload_api: Sequence[str] = (),
        listen: str | None = None,
        admin: str | None = None,
        metrics: str | None = None,
    ) -> BridgeConfig:
        """This config with command-line flags applied on top (flags win)."""
        updated = self
        if workload_api:
            for address in workload_api:
                if has_control(address):
                    raise ConfigError(
                        f"--workload-api: {address!r}: must not contain control characters"
                    )
            if self.per_caller is not None:
                raise ConfigError(
                    "--workload-api cannot be combined with per_caller: in per-caller mode "
                    "every caller is served its own identity, never the bridge's"
                )
            updated = replace(updated, workload_api=tuple(workload_api))
        if listen is not None:
            updated = replace(updated, listen=parse_listen(listen, "--listen"))
        if admin is not None:
            updated = replace(updated, admin=_parse_admin(admin, "--admin"))
        if metrics is not None:
            updated = replace(updated, metrics=_parse_metrics(metrics, "--metrics"))
        return updated


_TOP_KEYS = {
    "workload_api",
    "listen",
    "socket_mode",
    "allowed_uids",
    "allowed_gids",
    "names",
    "default_svid",
    "trust_domain",
    "disable_spiffe_cert_validation",
    "secrets",
    "policies",
    "admin",
    "failover",
    "upstream_backoff",
    "jwt_svids",
    "metrics",
    "per_caller",
}


class _Reader(Reader):
    """The shared strict-YAML Reader with the config's rules: strings are non-empty and
    free of control characters; plus the config's own value types."""

    def __init__(self) -> None:
        super().__init__(refuse_control=True)

    def fail(self, path: str, message: str) -> Invalid:
        return Invalid(path, message)

    def string(self, value: object, path: str, *, nonempty: bool = True) -> str:
        return super().string(value, path, nonempty=nonempty)

    def int_list(self, value: Any, path: str) -> frozenset[int]:
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in value
        ):
            raise self.fail(path, "must be a list of non-negative integers")
        return frozenset(value)

    def string_list(self, value: Any, path: str) -> list[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.fail(path, "must be a string or a list of strings")
        return [self.string(v, f"{path}[{i}]") for i, v in enumerate(value)]

    def spiffe_id(self, value: Any, path: str) -> str:
        text = self.string(value, path)
        try:
            return str(SpiffeId.parse(text))
        except InvalidSpiffeId as exc:
            raise self.fail(path, str(exc)) from exc

    def trust_domain(self, value: Any, path: str) -> TrustDomain:
        text = self.string(value, path)
        try:
            return TrustDomain.parse(text)
        except InvalidSpiffeId as exc:
            raise self.fail(path, str(exc)) from exc

    def selector(self, value: Any, path: str, extra: set[str] = frozenset()) -> SvidSelector:  # type: ignore[assignment]
        data = self.mapping(value, path, {"spiffe_id", "hint"} | extra)
        spiffe_id = (
            self.spiffe_id(data["spiffe_id"], f"{path}.spiffe_id") if "spiffe_id" in data else None
        )
        hint = self.string(data["hint"], f"{path}.hint") if "hint" in data else None
        if spiffe_id is None and hint is None:
            raise self.fail(path, "needs spiffe_id or hint")
        return SvidSelector(spiffe_id, hint)


def _ip_port(host: str, port: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``host`` as an IP address and ``port`` (at most five digits) as a number; else ValueError.

    The range (0-65535) is the caller's check, so its message can come after others.
    """
    ip = ipaddress.ip_address(host)
    if not port.isdigit() or len(port) > 5:
        raise ValueError(port)
    return ip, int(port)


def parse_listen(text: str, where: str) -> ListenAddress:
    """Parse ``unix:///abs/path`` or ``tcp://127.0.0.1:PORT``; TCP must be loopback."""
    if has_control(text):
        raise ConfigError(f"{where}: {text!r}: must not contain control characters")
    if text.startswith("unix://"):
        try:
            return ListenAddress(path=unix_socket_path(text))
        except ValueError as exc:
            raise ConfigError(f"{where}: {text!r}: {exc}") from None
    if text.startswith("tcp://"):
        host, _, port = text[len("tcp://") :].rpartition(":")
        host = host.strip("[]")
        try:
            ip, number = _ip_port(host, port)
        except ValueError as exc:
            raise ConfigError(f"{where}: {text!r}: want tcp://IP:PORT") from exc
        if not ip.is_loopback:
            raise ConfigError(
                f"{where}: {text!r}: TCP listening is allowed on loopback only "
                "(TCP callers cannot be identified; use a unix socket)"
            )
        if not 0 <= number <= 65535:
            raise ConfigError(f"{where}: {text!r}: port out of range")
        return ListenAddress(host=str(ip), port=number)
    raise ConfigError(f"{where}: {text!r}: want unix:///path or tcp://127.0.0.1:PORT")


def _parse_admin(text: str, where: str) -> AdminConfig:
    if text in ("", "off", "none"):
        return AdminConfig(port=None)
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        ip, number = _ip_port(host, port)
    except ValueError as exc:
        raise ConfigError(f"{where}: {text!r}: want HOST:PORT on loopback, or off") from exc
    if not ip.is_loopback:
        raise ConfigError(f"{where}: {text!r}: the admin endpoint listens on loopback only")
    if not 0 <= number <= 65535:
        raise ConfigError(f"{where}: {text!r}: port out of range")
    return AdminConfig(host=str(ip), port=number)


def _parse_metrics(text: str, where: str) -> MetricsConfig | None:
    """``HOST:PORT`` (any IP, ``[v6]`` in brackets; port 0 = any), or ``off``."""
    if text in ("", "off", "none"):
        return None
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    try:
        ip, number = _ip_port(host, port)
    except ValueError as exc:
        raise ConfigError(
            f"{where}: {text!r}: want IP:PORT (e.g. 0.0.0.0:9102 or [::]:9102), or off"
        ) from exc
    if not sep or (ip.version == 6 and not bracketed):
        raise ConfigError(f"{where}: {text!r}: write an IPv6 address in brackets, e.g. [::]:9102")
    if not 0 <= number <= 65535:
        raise ConfigError(f"{where}: {text!r}: port out of range")
    return MetricsConfig(host=str(ip), port=number)


def _parse_policy(reader: _Reader, value: Any, path: str) -> Policy:
    data = reader.mapping(value, path, {"name", "trust_domains", "allow", "workloads"})
    if "name" not in data:
        raise reader.fail(path, "needs a name")
    name = reader.string(data["name"], f"{path}.name")
    raw_tds = data.get("trust_domains", []) or []
    if not isinstance(raw_tds, list):
        raise reader.fail(f"{path}.trust_domains", "must be a list of trust domain names")
    tds = tuple(reader.trust_domain(v, f"{path}.trust_domains[{i}]") for i, v in enumerate(raw_tds))
    if "allow" not in data:
        raise reader.fail(path, "needs an allow list (SPIFFE IDs, or prefixes ending in /*)")
    exact: list[str] = []
    prefixes: list[str] = []
    for pattern in _patterns(reader, data["allow"], f"{path}.allow"):
        (prefixes if pattern.prefix else exact).append(pattern.value)
    workloads: tuple[IdPattern, ...] = ()
    if "workloads" in data:
        workloads = tuple(_patterns(reader, data["workloads"], f"{path}.workloads"))
        if not workloads:
            raise reader.fail(f"{path}.workloads", "is empty; leave it out to mean every workload")
    return Policy(name, tds, tuple(exact), tuple(prefixes), workloads)


def _check_names(reader: _Reader, config: BridgeConfig, builtin: set[str]) -> None:
    """Configured names are not built-in names and are unique, except that a policy name
    may repeat with different ``workloads`` as long as each entry can apply to someone."""
    seen: dict[str, str] = {}
    catch_all: dict[str, str] = {}  # policy name -> the entry that applies to every workload
    scopes: dict[tuple[str, tuple[IdPattern, ...]], str] = {}
    named: list[tuple[str, str, Policy | None]] = [
        (f"secrets[{i}]", s.name, None) for i, s in enumerate(config.secrets)
    ] + [(f"policies[{i}]", p.name, p) for i, p in enumerate(config.policies)]
    for entry, name, policy in named:
        where = f"{entry}.name"
        if name in builtin or name.startswith("spiffe://"):
            raise reader.fail(where, f"{name!r} is a built-in resource name")
        before = seen.setdefault(name, where)
        if before != where and (policy is None or before.startswith("secrets")):
            raise reader.fail(where, f"{name!r} is already used by {before}")
        if policy is None:
            continue
        if name in catch_all:
            raise reader.fail(
                where,
                f"{name!r} can never apply: {catch_all[name]} (no workloads) "
                "already applies to every workload",
            )
        same = scopes.setdefault((name, policy.workloads), entry)
        if same != entry:
            raise reader.fail(
                where, f"{name!r} can never apply: {same} has the same workloads ({policy.scope})"
            )
        if not policy.workloads:
            catch_all[name] = entry


def _patterns(reader: _Reader, value: Any, path: str) -> list[IdPattern]:
    """A list of SPIFFE IDs or ``spiffe://td/path/*`` prefixes (:class:`IdPattern`)."""
    out = []
    for index, entry in enumerate(reader.string_list(value, path)):
        try:
            out.append(IdPattern.parse(entry))
        except InvalidSpiffeId as exc:
            problem = f"{entry!r}: {exc}" if str(exc) == WILDCARD_RULE else str(exc)
            raise reader.fail(f"{path}[{index}]", problem) from exc
    return out


def parse_config(data: Any, source: str) -> BridgeConfig:
    """Validate parsed YAML ``data``; raise ConfigError naming ``source`` and the key."""
    try:
        return _parse_config(_Reader(), data, source)
    except Invalid as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _parse_config(reader: _Reader, data: Any, source: str) -> BridgeConfig:
    if data is None:
        data = {}
    top = reader.mapping(data, "", _TOP_KEYS)
    config = BridgeConfig(source=source)
    if "workload_api" in top:
        config = replace(
            config, workload_api=tuple(reader.string_list(top["workload_api"], "workload_api"))
        )
    if "listen" in top:
        text = reader.string(top["listen"], "listen")
        config = replace(config, listen=parse_listen(text, f"{source}: listen"))
    if "socket_mode" in top:
        raw = top["socket_mode"]
        if isinstance(raw, int) and not isinstance(raw, bool):
            raise reader.fail("socket_mode", "write it as a quoted octal string such as '0600'")
        if not isinstance(raw, str) or not 1 <= len(raw) <= 4 or not set(raw) <= set("01234567"):
            raise reader.fail("socket_mode", "must be an octal string such as '0600'")
        mode = int(raw, 8)
        if mode & ~0o777 or mode & 0o007:
            raise reader.fail(
                "socket_mode", f"{raw!r}: must not grant access to others (at most '0660')"
            )
        config = replace(config, socket_mode=mode)
    if "allowed_uids" in top:
        config = replace(config, allowed_uids=reader.int_list(top["allowed_uids"], "allowed_uids"))
    if "allowed_gids" in top:
        config = replace(config, allowed_gids=reader.int_list(top["allowed_gids"], "allowed_gids"))
    if "names" in top:
        given = reader.mapping(top["names"], "names", {"default_svid", "own_bundle", "all_bundles"})
        values = {k: reader.string(v, f"names.{k}") for k, v in given.items()}
        config = replace(config, names=Names(**values))
    if "default_svid" in top:
        config = replace(config, default_svid=reader.selector(top["default_svid"], "default_svid"))
    if "trust_domain" in top:
        config = replace(
            config, trust_domain=reader.trust_domain(top["trust_domain"], "trust_domain")
        )
    if "disable_spiffe_cert_validation" in top:
        config = replace(
            config,
            disable_spiffe_cert_validation=reader.boolean(
                top["disable_spiffe_cert_validation"], "disable_spiffe_cert_validation"
            ),
        )
    builtin = {config.names.default_svid, config.names.own_bundle, config.names.all_bundles}
    if "secrets" in top:
        if not isinstance(top["secrets"], list):
            raise reader.fail("secrets", "must be a list")
        secrets = []
        for index, value in enumerate(top["secrets"]):
            path = f"secrets[{index}]"
            entry = reader.mapping(value, path, {"name", "spiffe_id", "hint"})
            if "name" not in entry:
                raise reader.fail(path, "needs a name")
            name = reader.string(entry["name"], f"{path}.name")
            selector = reader.selector({k: v for k, v in entry.items() if k != "name"}, path)
            secrets.append(NamedSecret(name, selector))
        config = replace(config, secrets=tuple(secrets))
    if "policies" in top:
        if not isinstance(top["policies"], list):
            raise reader.fail("policies", "must be a list")
        config = replace(
            config,
            policies=tuple(
                _parse_policy(reader, v, f"policies[{i}]") for i, v in enumerate(top["policies"])
            ),
        )
    _check_names(reader, config, builtin)
    if "failover" in top:
        config = replace(config, failover=_parse_failover(reader, top["failover"]))
    if "admin" in top:
        admin = top["admin"]
        if admin in (None, False, "off"):
            config = replace(config, admin=AdminConfig(port=None))
        else:
            config = replace(
                config, admin=_parse_admin(reader.string(admin, "admin"), f"{source}: admin")
            )
    if "per_caller" in top:
        config = replace(config, per_caller=_parse_per_caller(reader, top["per_caller"], config))
    if "metrics" in top:
        metrics = top["metrics"]
        if metrics in (None, False, "off"):
            config = replace(config, metrics=None)
        else:
            config = replace(
                config,
                metrics=_parse_metrics(reader.string(metrics, "metrics"), f"{source}: metrics"),
            )
    return _parse_upstream(reader, top, config)


# -- upstream and JWT-SVID limits ---------------------------------------------------------


def _parse_per_caller(reader: _Reader, value: Any, config: BridgeConfig) -> PerCaller:
    """``per_caller.delegated_identity_api``: one address or a list, each a valid address;
    exclusive with ``workload_api`` (in this mode the bridge has no identity to serve)."""
    data = reader.mapping(value, "per_caller", {"delegated_identity_api", "max_callers"})
    if "delegated_identity_api" not in data:
        raise reader.fail("per_caller", "needs delegated_identity_api (the agent's admin socket)")
    raw = data["delegated_identity_api"]
    path = "per_caller.delegated_identity_api"
    if isinstance(raw, str):
        addresses = [reader.string(raw, path)]
    else:
        addresses = reader.string_list(raw, path)
    if not addresses:
        raise reader.fail(path, "is empty: give the Delegated Identity API's address")
    for index, text in enumerate(addresses):
        try:
            parse_address(text)
        except ConfigError as exc:
            where = path if len(addresses) == 1 else f"{path}[{index}]"
            raise reader.fail(where, str(exc)) from exc
    if config.workload_api:
        raise reader.fail(
            "per_caller",
            "cannot be combined with workload_api: in per-caller mode every caller is "
            "served its own identity, never the bridge's",
        )
    max_callers = DEFAULT_MAX_CALLERS
    if "max_callers" in data:
        raw_max = data["max_callers"]
        if not isinstance(raw_max, int) or isinstance(raw_max, bool) or not 1 <= raw_max <= 65536:
            raise reader.fail("per_caller.max_callers", "must be an integer from 1 to 65536")
        max_callers = raw_max
    return PerCaller(tuple(addresses), max_callers)


def _duration(reader: _Reader, value: Any, path: str, *, maximum: float) -> float:
    """Seconds from a Go-style duration (``0.1s``, ``250ms``, ``1h30m``) or a plain number."""
    limit = dt.timedelta(seconds=maximum)
    return reader.duration(value, path, maximum=limit, numbers=True).total_seconds()


def _parse_upstream(reader: _Reader, top: Mapping[str, Any], config: BridgeConfig) -> BridgeConfig:
    """``workload_api`` addresses checked as addresses; ``upstream_backoff``; ``jwt_svids``."""
    for index, text in enumerate(config.workload_api):
        try:
            parse_address(text)
        except ConfigError as exc:
            where = f"workload_api[{index}]" if len(config.workload_api) > 1 else "workload_api"
            raise reader.fail(where, str(exc)) from exc
    if "upstream_backoff" in top:
        data = reader.mapping(top["upstream_backoff"], "upstream_backoff", {"initial", "max"})
        backoff = UpstreamBackoff(
            *(
                _duration(reader, data[key], f"upstream_backoff.{key}", maximum=3600)
                if key in data
                else getattr(UpstreamBackoff(), key)
                for key in ("initial", "max")
            )
        )
        if backoff.max < backoff.initial:
            raise reader.fail("upstream_backoff", "max must not be less than initial")
        config = replace(config, upstream_backoff=backoff)
    if "jwt_svids" in top:
        data = reader.mapping(top["jwt_svids"], "jwt_svids", {"max_audiences", "idle_timeout"})
        limits = JwtLimits()
        if "max_audiences" in data:
            count = data["max_audiences"]
            if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 4096:
                raise reader.fail("jwt_svids.max_audiences", "must be an integer from 0 to 4096")
            limits = replace(limits, max_audiences=count)
        if "idle_timeout" in data:
            idle = _duration(reader, data["idle_timeout"], "jwt_svids.idle_timeout", maximum=86400)
            limits = replace(limits, idle_timeout=idle)
        config = replace(config, jwt_svids=limits)
    return config


@functools.cache
def _loader() -> Any:
    """The strict loader, built on first use: PyYAML is imported only when a config file
    is read (``sds run`` without ``--config`` never loads it)."""
    from sds._util.strictyaml import strict_loader  # noqa: PLC0415

    return strict_loader(
        fast=True,
        timestamps=False,  # ``2024-02-30`` stays a string
        merge_keys=False,
        refuse_tags=True,
        max_int_digits=MAX_INT_DIGITS,
        max_depth=MAX_DEPTH,
    )


_MAX_GRACE = dt.timedelta(hours=1)


def _parse_failover(reader: _Reader, value: Any) -> FailoverPolicy:
    given = reader.mapping(value, "failover", {"grace", "margin"})
    policy = FailoverPolicy()
    if "grace" in given:
        grace = reader.duration(given["grace"], "failover.grace", maximum=_MAX_GRACE)
        policy = replace(policy, grace=grace.total_seconds())
    if "margin" in given:
        margin = given["margin"]
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin < 1:
            raise reader.fail("failover.margin", "must be a fraction of the lifetime, 0 <= m < 1")
        policy = replace(policy, margin=float(margin))
    return policy


def read_config_bytes(path: str | Path) -> bytes:
    """The bytes of the regular file at ``path`` (at most MAX_CONFIG_BYTES); ConfigError otherwise.

    Opened non-blocking, so a FIFO or device is refused instead of hanging.
    """
    source = str(path)

    def refuse(reason: str) -> ConfigError:
        return ConfigError(f"{source}: cannot read: {reason}")

    try:
        return read_regular_file(path, MAX_CONFIG_BYTES, refuse)
    except (OSError, ValueError) as exc:
        raise refuse(os_reason(exc)) from exc


def parse_config_text(raw: bytes, source: str) -> BridgeConfig:
    """Decode, parse and validate config file contents; raise ConfigError with one line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 (byte {exc.start})") from exc
    import yaml  # noqa: PLC0415

    from sds._util.strictyaml import check_depth, describe  # noqa: PLC0415

    try:
        check_depth(text, _loader())
        data = yaml.load(text, Loader=_loader())  # noqa: S506 - a safe loader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {describe(exc)}") from exc
    except (ValueError, OverflowError, RecursionError) as exc:
        # explicit tags such as !!timestamp or !!float with values PyYAML cannot construct
        raise ConfigError(f"{source}: invalid YAML value: {str(exc)[:100]}") from exc
    if data is None or data == {}:
        raise ConfigError(
            f"{source}: is empty: a config file must be a non-empty mapping "
            "(refused, never read as 'no restrictions')"
        )
    return parse_config(data, source)


def load_config(path: str | Path) -> BridgeConfig:
    """Read and validate the YAML file at ``path``; raise ConfigError with one line."""
    return parse_config_text(read_config_bytes(path), str(path))


# Keys that take effect only at start (the socket, the upstream, the admin listener).
RESTART_KEYS = (
    "workload_api",
    "per_caller",
    "listen",
    "socket_mode",
    "admin",
    "metrics",
    "upstream_backoff",
    "jwt_svids",
)


def changed_keys(old: BridgeConfig, new: BridgeConfig) -> list[str]:
    """Top-level config fields whose values differ (``source`` ignored)."""
    return [
        f.name
        for f in fields(BridgeConfig)
        if f.name != "source" and getattr(old, f.name) != getattr(new, f.name)
    ]


def _ids(values: frozenset[int]) -> str:
    return "[" + ",".join(str(v) for v in sorted(values)) + "]"


def widened_keys(old: BridgeConfig, new: BridgeConfig) -> list[tuple[str, str, str]]:
    """Security-relevant settings ``new`` makes more permissive than ``old``: (key, old, new).

    Widening: an allow-list emptied (anyone who can open the socket) or given new
    members, socket mode bits added, SPIFFE validation disabled, a policy
    removed, or a policy admitting new peers or trusting new trust domains.
    """
    out: list[tuple[str, str, str]] = []
    restricted_before = bool(old.allowed_uids or old.allowed_gids)
    restricted_after = bool(new.allowed_uids or new.allowed_gids)
    for key in ("allowed_uids", "allowed_gids"):
        before, after = getattr(old, key), getattr(new, key)
        if not restricted_before:
            continue  # already open to anyone who can open the socket
        if not restricted_after and before:
            out.append((key, _ids(before), "[] (anyone who can open the socket)"))
        elif restricted_after and after - before:
            out.append((key, _ids(before), _ids(after)))
    if new.socket_mode & ~old.socket_mode:
        out.append(("socket_mode", f"{old.socket_mode:04o}", f"{new.socket_mode:04o}"))
    if new.disable_spiffe_cert_validation and not old.disable_spiffe_cert_validation:
        out.append(("disable_spiffe_cert_validation", "false", "true"))
    fresh = {(p.name, p.workloads): p for p in new.policies}
    for policy in old.policies:
        key = f"policies[{policy.name}]"
        if policy.workloads:
            key = f"policies[{policy.name} for {policy.scope}]"
        now = fresh.get((policy.name, policy.workloads))
        allow = policy.allow_text
        if now is None:
            out.append((key, f"allow={allow}", "removed"))
            continue
        now_allow = now.allow_text
        if set(now.exact) - set(policy.exact) or set(now.prefixes) - set(policy.prefixes):
            out.append((f"{key}.allow", allow, now_allow))
        if set(now.trust_domains) - set(policy.trust_domains) or (
            policy.trust_domains and not now.trust_domains
        ):
            out.append(
                (
                    f"{key}.trust_domains",
                    ",".join(td.name for td in policy.trust_domains) or "own",
                    ",".join(td.name for td in now.trust_domains) or "own",
                )
            )
    return out
