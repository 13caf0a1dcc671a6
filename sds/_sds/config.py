"""The ``sds run`` configuration: a YAML file checked strictly at load time.

Every key is documented in ``docs/configuration.md``. An unknown key, a value
of the wrong type or a bad SPIFFE ID raises ConfigError with one line naming
the file and the key path (``sds.yaml: policies[0].allow[1]: ...``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .._provider.identities import parse_duration
from .._spiffe import SpiffeId, TrustDomain
from ..errors import ConfigError, InvalidSpiffeId
from .upstreams import FailoverPolicy

__all__ = [
    "AdminConfig",
    "BridgeConfig",
    "ListenAddress",
    "NamedSecret",
    "Names",
    "Policy",
    "SvidSelector",
    "load_config",
    "parse_config",
    "parse_listen",
]


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
    trust domain.
    """

    name: str
    trust_domains: tuple[TrustDomain, ...]
    exact: tuple[str, ...]
    prefixes: tuple[str, ...]


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
    source: str = "<defaults>"

    def with_overrides(
        self,
        *,
        workload_api: Sequence[str] = (),
        listen: str | None = None,
        admin: str | None = None,
    ) -> BridgeConfig:
        """This config with command-line flags applied on top (flags win)."""
        updated = self
        if workload_api:
            updated = replace(updated, workload_api=tuple(workload_api))
        if listen is not None:
            updated = replace(updated, listen=parse_listen(listen, "--listen"))
        if admin is not None:
            updated = replace(updated, admin=_parse_admin(admin, "--admin"))
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
}


class _Reader:
    """Walks a YAML mapping, naming the key path in every error."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(
            f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}"
        )

    def mapping(self, value: Any, path: str, allowed: set[str]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a mapping, not {type(value).__name__}")
        for key in value:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                raise self.fail(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, "must be a non-empty string")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, "must be true or false")
        return value

    def int_list(self, value: Any, path: str) -> frozenset[int]:
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
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


def parse_listen(text: str, where: str) -> ListenAddress:
    """Parse ``unix:///abs/path`` or ``tcp://127.0.0.1:PORT``; TCP must be loopback."""
    if text.startswith("unix://"):
        path = text[len("unix://") :]
        if not path.startswith("/"):
            raise ConfigError(f"{where}: {text!r}: unix socket path must be absolute")
        if len(path.encode()) > 107:
            raise ConfigError(f"{where}: {text!r}: unix socket path is longer than 107 bytes")
        return ListenAddress(path=path)
    if text.startswith("tcp://"):
        host, _, port = text[len("tcp://") :].rpartition(":")
        host = host.strip("[]")
        try:
            ip = ipaddress.ip_address(host)
            number = int(port)
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
        ip = ipaddress.ip_address(host)
        number = int(port)
    except ValueError as exc:
        raise ConfigError(f"{where}: {text!r}: want HOST:PORT on loopback, or off") from exc
    if not ip.is_loopback:
        raise ConfigError(f"{where}: {text!r}: the admin endpoint listens on loopback only")
    if not 0 <= number <= 65535:
        raise ConfigError(f"{where}: {text!r}: port out of range")
    return AdminConfig(host=str(ip), port=number)


def _parse_policy(reader: _Reader, value: Any, path: str) -> Policy:
    data = reader.mapping(value, path, {"name", "trust_domains", "allow"})
    if "name" not in data:
        raise reader.fail(path, "needs a name")
    name = reader.string(data["name"], f"{path}.name")
    tds = tuple(
        reader.trust_domain(v, f"{path}.trust_domains[{i}]")
        for i, v in enumerate(data.get("trust_domains", []) or [])
    )
    if "allow" not in data:
        raise reader.fail(path, "needs an allow list (SPIFFE IDs, or prefixes ending in /*)")
    exact: list[str] = []
    prefixes: list[str] = []
    for index, entry in enumerate(reader.string_list(data["allow"], f"{path}.allow")):
        where = f"{path}.allow[{index}]"
        if entry.endswith("/*"):
            base = reader.spiffe_id(entry[:-2], where)
            prefixes.append(base + "/")
        elif "*" in entry:
            raise reader.fail(where, f"{entry!r}: '*' is allowed only as a final '/*'")
        else:
            exact.append(reader.spiffe_id(entry, where))
    return Policy(name, tds, tuple(exact), tuple(prefixes))


def parse_config(data: Any, source: str) -> BridgeConfig:
    """Validate parsed YAML ``data``; raise ConfigError naming ``source`` and the key."""
    reader = _Reader(source)
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
        try:
            mode = int(raw, 8) if isinstance(raw, str) else int(raw)
        except (TypeError, ValueError) as exc:
            raise reader.fail("socket_mode", "must be an octal string such as '0600'") from exc
        if isinstance(raw, int) and not isinstance(raw, bool):
            raise reader.fail("socket_mode", "write it as a quoted octal string such as '0600'")
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
    seen: dict[str, str] = {}
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
    named: list[tuple[str, str]] = [
        (f"secrets[{i}].name", s.name) for i, s in enumerate(config.secrets)
    ] + [(f"policies[{i}].name", p.name) for i, p in enumerate(config.policies)]
    for where, name in named:
        if name in builtin or name.startswith("spiffe://"):
            raise reader.fail(where, f"{name!r} is a built-in resource name")
        if name in seen:
            raise reader.fail(where, f"{name!r} is already used by {seen[name]}")
        seen[name] = where
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
    return config


_MAX_GRACE = dt.timedelta(hours=1)


def _parse_failover(reader: _Reader, value: Any) -> FailoverPolicy:
    given = reader.mapping(value, "failover", {"grace", "margin"})
    policy = FailoverPolicy()
    if "grace" in given:
        try:
            grace = parse_duration(reader.string(given["grace"], "failover.grace"))
        except ValueError as exc:
            raise reader.fail("failover.grace", str(exc)) from exc
        if grace > _MAX_GRACE:
            raise reader.fail("failover.grace", f"{given['grace']!r}: must be at most 1h")
        policy = replace(policy, grace=grace.total_seconds())
    if "margin" in given:
        margin = given["margin"]
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin < 1:
            raise reader.fail("failover.margin", "must be a fraction of the lifetime, 0 <= m < 1")
        policy = replace(policy, margin=float(margin))
    return policy


def load_config(path: str | Path) -> BridgeConfig:
    """Read and validate the YAML file at ``path``; raise ConfigError with one line."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: {where}invalid YAML: {problem}") from exc
    return parse_config(data, source)
