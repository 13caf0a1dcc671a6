"""What the provider hands out: ``workload_identity`` documents and federated bundles.

An identities file holds one or more YAML documents shaped like Teleport's
``workload_identity`` resource, so files written for Teleport load unchanged::

    kind: workload_identity
    version: v1
    metadata: {name: web, labels: {team: a}}
    spec:
      spiffe:
        id: /svc/web                    # path in the provider's trust domain
        hint: web
        x509: {dns_sans: [web.local], ip_sans: [10.0.0.1], maximum_ttl: 30m}
        jwt: {maximum_ttl: 5m}
      rules:
        allow:
          - conditions:
              - attribute: workload.unix.uid
                eq: {value: 1000}

A rule passes when all its conditions pass; an identity is issued when any
rule passes; an identity without rules is issued to every caller. Identities
keep file order (a directory is read in file-name order), which is the order
of SVIDs in a response: the first is the caller's default SVID (Workload API
standard, section 5.3).

A federated bundle (``--federate TD=FILE``) is a PEM file of CA certificates
or a SPIFFE bundle JWKS (SPIFFE Trust Domain and Bundle standard, section 4):
keys with ``use: x509-svid`` carry one ``x5c`` certificate, keys with
``use: jwt-svid`` are JWT authorities.

Every problem raises :class:`sds.errors.ConfigError` with one line naming the
file, the document (1-based) and the field path.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import yaml
from cryptography import x509

from sds._util.duration import MAX_DURATION
from sds._util.files import os_reason
from sds._util.files import read_regular_file as _read_bounded
from sds._util.log import event
from sds._util.peercred import PeerCredentials
from sds._util.strictyaml import Invalid, Reader, describe, join, strict_loader, type_name
from sds._util.text import show as _show
from sds.errors import ConfigError, InvalidBundle, InvalidSpiffeId
from sds.spiffe.id import SpiffeId, TrustDomain
from sds.spiffe.jwt import JwtBundle
from sds.spiffe.x509 import X509Bundle, is_ca, utcnow

__all__ = [
    "ATTRIBUTES",
    "MAX_FILE_BYTES",
    "MAX_TTL",
    "MIN_TTL",
    "OPERATORS",
    "Condition",
    "FederatedBundle",
    "Identity",
    "Rule",
    "entitled",
    "load_federated_bundle",
    "load_federation",
    "load_identities",
    "parse_federated_bundle",
    "parse_identities",
]

logger = logging.getLogger("sds.provider")

# SVID lifetimes are whole seconds on the wire (X.509 validity, JWT exp).
MIN_TTL = dt.timedelta(seconds=1)
# Longer than any CA we issue from lives; also keeps datetime arithmetic in range.
MAX_TTL = MAX_DURATION
# Identities and federation files are small; a bigger one is a mistake (or an attack).
MAX_FILE_BYTES = 4 * 1024 * 1024
# uid, gid and pid are 32-bit in the kernel.
_MAX_ID = 2**32 - 1
ATTRIBUTES = ("workload.unix.gid", "workload.unix.pid", "workload.unix.uid")
OPERATORS = ("eq", "in", "not_eq", "not_in")

# Teleport fields we accept so existing files load, but do not act on.
_IGNORED = {
    "spec.spiffe.x509.subject_template": "X.509 subject templates are not implemented",
    "spec.spiffe.jwt.extra_claims": "extra JWT claims are not implemented",
}
_warned: set[tuple[str, str]] = set()

_DNS_RE = re.compile(
    r"(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?"
)
_DIGITS = re.compile(r"[0-9]+")


def read_regular_file(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes.

    Opened non-blocking, so a FIFO or device is refused instead of hanging.
    Raises ConfigError naming the file.
    """
    try:
        return _read_bounded(path, limit, lambda why: ConfigError(f"{path}: {why}"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{_path_text(path)}: cannot read: {os_reason(exc)}") from exc


def _path_text(path: Path) -> str:
    return repr(str(path)) if "\0" in str(path) else str(path)


@dataclass(frozen=True, slots=True)
class Condition:
    """One attribute test: ``attribute`` compared with ``values`` by ``operator``."""

    attribute: str
    operator: str
    values: frozenset[int]

    def matches(self, creds: PeerCredentials) -> bool:
        """Whether the kernel-reported credentials satisfy this condition."""
        actual = {
            "workload.unix.uid": creds.uid,
            "workload.unix.gid": creds.gid,
            "workload.unix.pid": creds.pid,
        }[self.attribute]
        if self.operator in ("eq", "in"):
            return actual in self.values
        return actual not in self.values


@dataclass(frozen=True, slots=True)
class Rule:
    """An allow rule: passes when every condition passes (no conditions: always)."""

    conditions: tuple[Condition, ...]

    def matches(self, creds: PeerCredentials) -> bool:
        """Whether every condition holds for ``creds``."""
        return all(condition.matches(creds) for condition in self.conditions)


@dataclass(frozen=True, slots=True)
class Identity:
    """One ``workload_identity``: what to issue and to whom.

    ``x509_ttl`` and ``jwt_ttl`` (``spec.spiffe.*.maximum_ttl``) replace the
    provider's default lifetimes when set. ``expires`` (``metadata.expires``)
    ends the identity: after it nothing is issued and SVIDs never outlive it.
    """

    name: str
    spiffe_id: SpiffeId
    hint: str = ""
    dns_sans: tuple[str, ...] = ()
    ip_sans: tuple[str, ...] = ()
    x509_ttl: dt.timedelta | None = None
    jwt_ttl: dt.timedelta | None = None
    rules: tuple[Rule, ...] = ()
    expires: dt.datetime | None = None
    description: str = ""
    labels: Mapping[str, str] = field(default_factory=dict, compare=False)
    source: str = field(default="", compare=False)

    def entitles(self, creds: PeerCredentials, now: dt.datetime | None = None) -> bool:
        """Whether this identity is issued to ``creds``: not expired and any rule passes."""
        if self.expires is not None and (now or utcnow()) >= self.expires:
            return False
        return not self.rules or any(rule.matches(creds) for rule in self.rules)


def entitled(
    identities: Iterable[Identity], creds: PeerCredentials, now: dt.datetime | None = None
) -> tuple[Identity, ...]:
    """The identities issued to ``creds``, in configuration order (first = default)."""
    now = now or utcnow()
    return tuple(identity for identity in identities if identity.entitles(creds, now))


# ---------------------------------------------------------------------------
# Identities files


# Teleport writes ``labels:`` (null) for none: a null field counts as absent.
_READER = Reader(nulls_absent=True)
_mapping = _READER.mapping
_required = _READER.required
_string = _READER.string
_list = _READER.list


def _fail(path: str, message: str) -> NoReturn:
    raise Invalid(path, message)


def _duration(value: object, path: str) -> dt.timedelta:
    return _READER.duration(value, path, maximum=MAX_TTL, minimum=MIN_TTL)


def _integer(value: object, path: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        number = value
    elif isinstance(value, str) and len(value) <= 20 and _DIGITS.fullmatch(value):
        number = int(value)
    else:
        _fail(path, f"want a non-negative integer or numeric string, got {_show(value)}")
    if number > _MAX_ID:
        _fail(path, f"{_show(number)} is out of range (at most {_MAX_ID})")
    return number


def _timestamp(value: object, path: str) -> dt.datetime:
    if isinstance(value, dt.datetime):
        stamp = value
    elif isinstance(value, dt.date):
        stamp = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            stamp = dt.datetime.fromisoformat(value)
        except ValueError:
            _fail(path, f"want an RFC 3339 timestamp, got {_show(value)}")
    else:
        _fail(path, f"want an RFC 3339 timestamp, got {type_name(value)}")
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=dt.UTC)


def _warn_ignored(path: str, name: str, source: str) -> None:
    if (name, path) in _warned:
        return
    _warned.add((name, path))
    event(
        logger,
        logging.WARNING,
        "identity.field_ignored",
        identity=name,
        field=path,
        source=source,
        reason=_IGNORED[path],
    )


def _condition(value: object, path: str) -> Condition:
    if isinstance(value, dict):
        for key in value:
            if key != "attribute" and key not in OPERATORS:
                _fail(path, f"unknown operator {key!r} (want one of {', '.join(OPERATORS)})")
    body = _mapping(value, path, ("attribute", *OPERATORS))
    attribute = _string(_required(body, "attribute", path), join(path, "attribute"))
    if attribute not in ATTRIBUTES:
        _fail(
            join(path, "attribute"),
            f"unknown attribute {attribute!r} (want one of {', '.join(ATTRIBUTES)})",
        )
    operators = [key for key in OPERATORS if key in body]
    if len(operators) != 1:
        got = " and ".join(operators) if operators else "none"
        _fail(path, f"want exactly one operator of {', '.join(OPERATORS)}, got {got}")
    operator = operators[0]
    op_path = join(path, operator)
    if operator in ("eq", "not_eq"):
        operand = _mapping(body[operator], op_path, ("value",))
        raw = _required(operand, "value", op_path)
        values = frozenset({_integer(raw, join(op_path, "value"))})
    else:
        operand = _mapping(body[operator], op_path, ("values",))
        items = _list(_required(operand, "values", op_path), join(op_path, "values"))
        values = frozenset(
            _integer(item, f"{op_path}.values[{index}]") for index, item in enumerate(items)
        )
    return Condition(attribute, operator, values)


def _rules(value: object, path: str) -> tuple[Rule, ...]:
    body = _mapping(value, path, ("allow",))
    rules: list[Rule] = []
    allow_path = join(path, "allow")
    for index, raw in enumerate(_list(body.get("allow", []), allow_path)):
        rule_path = f"{allow_path}[{index}]"
        rule = _mapping(raw, rule_path, ("conditions", "expression"))
        if "expression" in rule:
            _fail(
                join(rule_path, "expression"),
                "rule expressions are not supported; use conditions",
            )
        conditions_path = join(rule_path, "conditions")
        conditions = tuple(
            _condition(item, f"{conditions_path}[{position}]")
            for position, item in enumerate(_list(rule.get("conditions", []), conditions_path))
        )
        rules.append(Rule(conditions))
    return tuple(rules)


def _identity(doc: object, trust_domain: TrustDomain, source: str) -> Identity:
    top = _mapping(doc, "", ("kind", "metadata", "spec", "sub_kind", "version"))
    kind = _string(_required(top, "kind", ""), "kind")
    if kind != "workload_identity":
        _fail("kind", f"want 'workload_identity', got {kind!r}")
    version = _string(_required(top, "version", ""), "version")
    if version != "v1":
        _fail("version", f"want 'v1', got {version!r}")
    if "sub_kind" in top:
        _string(top["sub_kind"], "sub_kind")

    meta = _mapping(
        _required(top, "metadata", ""),
        "metadata",
        ("description", "expires", "labels", "name", "revision"),
    )
    name = _string(_required(meta, "name", "metadata"), "metadata.name", nonempty=True)
    description = _string(meta.get("description", ""), "metadata.description")
    labels: dict[str, str] = {}
    raw_labels = meta.get("labels", {})
    if not isinstance(raw_labels, dict):
        _fail("metadata.labels", f"want a mapping, got {type_name(raw_labels)}")
    for key, label in raw_labels.items():
        key_text = _string(key, "metadata.labels")
        labels[key_text] = _string(label, f"metadata.labels.{key_text}")
    expires = _timestamp(meta["expires"], "metadata.expires") if "expires" in meta else None
    if "revision" in meta:
        _string(meta["revision"], "metadata.revision")

    spec = _mapping(_required(top, "spec", ""), "spec", ("rules", "spiffe"))
    spiffe = _mapping(
        _required(spec, "spiffe", "spec"), "spec.spiffe", ("hint", "id", "jwt", "x509")
    )
    raw_id = _string(_required(spiffe, "id", "spec.spiffe"), "spec.spiffe.id", nonempty=True)
    if "{{" in raw_id:
        _fail("spec.spiffe.id", f"templates are not supported, got {_show(raw_id)}")
    if raw_id.startswith("spiffe://"):
        _fail(
            "spec.spiffe.id",
            f"{_show(raw_id)} is a full SPIFFE ID; give the path only "
            f"(the trust domain is {trust_domain.name})",
        )
    try:
        spiffe_id = SpiffeId.from_path(trust_domain, raw_id)
    except InvalidSpiffeId as exc:
        _fail("spec.spiffe.id", str(exc))
    hint = _string(spiffe.get("hint", ""), "spec.spiffe.hint")

    x509_spec = _mapping(
        spiffe.get("x509", {}),
        "spec.spiffe.x509",
        ("dns_sans", "ip_sans", "maximum_ttl", "subject_template"),
    )
    dns_sans: list[str] = []
    for index, item in enumerate(_list(x509_spec.get("dns_sans", []), "spec.spiffe.x509.dns_sans")):
        where = f"spec.spiffe.x509.dns_sans[{index}]"
        dns = _string(item, where, nonempty=True)
        if not dns.isascii() or not _DNS_RE.fullmatch(dns):
            _fail(where, f"not a DNS name: {dns!r}")
        dns_sans.append(dns)
    ip_sans: list[str] = []
    for index, item in enumerate(_list(x509_spec.get("ip_sans", []), "spec.spiffe.x509.ip_sans")):
        where = f"spec.spiffe.x509.ip_sans[{index}]"
        try:
            ip_sans.append(str(ipaddress.ip_address(_string(item, where))))
        except ValueError:
            _fail(where, f"not an IP address: {item!r}")
    x509_ttl = (
        _duration(x509_spec["maximum_ttl"], "spec.spiffe.x509.maximum_ttl")
        if "maximum_ttl" in x509_spec
        else None
    )
    if "subject_template" in x509_spec:
        _warn_ignored("spec.spiffe.x509.subject_template", name, source)

    jwt_spec = _mapping(spiffe.get("jwt", {}), "spec.spiffe.jwt", ("extra_claims", "maximum_ttl"))
    jwt_ttl = (
        _duration(jwt_spec["maximum_ttl"], "spec.spiffe.jwt.maximum_ttl")
        if "maximum_ttl" in jwt_spec
        else None
    )
    if "extra_claims" in jwt_spec:
        _warn_ignored("spec.spiffe.jwt.extra_claims", name, source)

    rules = _rules(spec["rules"], "spec.rules") if "rules" in spec else ()
    return Identity(
        name=name,
        spiffe_id=spiffe_id,
        hint=hint,
        dns_sans=tuple(dns_sans),
        ip_sans=tuple(ip_sans),
        x509_ttl=x509_ttl,
        jwt_ttl=jwt_ttl,
        rules=rules,
        expires=expires,
        description=description,
        labels=labels,
        source=source,
    )


# Teleport's files carry unquoted RFC 3339 ``metadata.expires`` and YAML merges.
_LOADER = strict_loader(fast=False, timestamps=True, merge_keys=True, refuse_tags=False)


def parse_identities(text: str, trust_domain: TrustDomain, source: str) -> list[Identity]:
    """Parse every ``workload_identity`` document in ``text``; ``source`` names it in errors.

    Empty documents are skipped but still counted, so document numbers match
    the ``---`` separators in the file.
    """
    identities: list[Identity] = []
    index = 0
    try:
        docs = yaml.load_all(text, Loader=_LOADER)
        while True:
            try:
                doc = next(docs)
            except StopIteration:
                break
            except (ValueError, OverflowError, RecursionError) as exc:
                # The constructor's own errors: impossible dates, huge integers, deep nesting.
                raise ConfigError(
                    f"{source}: document {index + 1}: invalid YAML value: {_value_problem(exc)}"
                ) from None
            index += 1
            if doc is None:
                continue
            try:
                identities.append(_identity(doc, trust_domain, f"{source}: document {index}"))
            except Invalid as exc:
                raise ConfigError(f"{source}: document {index}: {exc}") from None
            except RecursionError:
                raise ConfigError(f"{source}: document {index}: nested too deeply") from None
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(f"{source}: document {index + 1}: {describe(exc)}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {describe(exc)}") from exc
    return identities


def _value_problem(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    text = str(exc)
    if "digits" in text and "integer" in text:
        return "integer with too many digits"
    return text.split(";", maxsplit=1)[0]


def _files(path: Path) -> list[Path]:
    try:
        is_dir = path.is_dir()
        children = list(path.iterdir()) if is_dir else []
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{_path_text(path)}: cannot read: {reason}") from exc
    if is_dir:
        files = sorted(
            child
            for child in children
            if child.suffix in (".yaml", ".yml")
            and not child.name.startswith(".")
            and child.is_file()
        )
        if not files:
            raise ConfigError(f"{path}: directory has no *.yaml or *.yml files")
        return files
    return [path]


def load_identities(path: Path, trust_domain: TrustDomain) -> tuple[Identity, ...]:
    """Load identities from a file or a directory of ``*.yaml``/``*.yml`` files (name order).

    Raises ConfigError for unreadable files, any invalid document, duplicate
    ``metadata.name`` values, or when no identity is defined at all.
    """
    identities: list[Identity] = []
    names: dict[str, str] = {}
    for file in _files(path):
        data = read_regular_file(file)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{file}: not UTF-8 text") from exc
        for identity in parse_identities(text, trust_domain, str(file)):
            first = names.get(identity.name)
            if first is not None:
                raise ConfigError(
                    f"{identity.source}: metadata.name: duplicate name {identity.name!r} "
                    f"(first in {first})"
                )
            names[identity.name] = identity.source
            identities.append(identity)
    if not identities:
        raise ConfigError(f"{path}: no workload_identity documents")
    return tuple(identities)


# ---------------------------------------------------------------------------
# Federation


@dataclass(frozen=True, slots=True)
class FederatedBundle:
    """A foreign trust domain's authorities; either side may be absent."""

    trust_domain: TrustDomain
    x509: X509Bundle | None
    jwt: JwtBundle | None
    source: str = ""


def load_federated_bundle(trust_domain: TrustDomain, path: Path) -> FederatedBundle:
    """Read a PEM bundle or SPIFFE bundle JWKS for ``trust_domain``; errors name the file."""
    return parse_federated_bundle(trust_domain, read_regular_file(path), str(path))


def parse_federated_bundle(trust_domain: TrustDomain, data: bytes, path: str) -> FederatedBundle:
    """Parse PEM CA certificates or a SPIFFE bundle JWKS; ``path`` names the source in errors."""
    if b"-----BEGIN" in data:
        try:
            bundle = X509Bundle.from_pem(trust_domain, data)
        except InvalidBundle as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        for cert in bundle.authorities:
            try:
                authority = is_ca(cert)
            except ValueError:  # a malformed basicConstraints: not usable as a CA
                authority = False
            if not authority:
                raise ConfigError(
                    f"{path}: certificate {cert.subject.rfc4514_string()!r} is not a CA"
                )
        return FederatedBundle(trust_domain, bundle, None, str(path))
    if data.lstrip().startswith(b"{"):
        return _from_jwks(trust_domain, path, data)
    raise ConfigError(f"{path}: neither PEM certificates nor a SPIFFE bundle JWKS")


def _from_jwks(trust_domain: TrustDomain, path: str, data: bytes) -> FederatedBundle:
    try:
        doc = json.loads(data)
    except RecursionError:
        raise ConfigError(f"{path}: not JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ConfigError(f"{path}: SPIFFE bundle JWKS has no 'keys' list")
    authorities: list[x509.Certificate] = []
    for index, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, dict):
            raise ConfigError(f"{path}: keys[{index}]: want an object")
        if jwk.get("use") != "x509-svid":
            continue
        chain = jwk.get("x5c")
        if not isinstance(chain, list) or len(chain) != 1 or not isinstance(chain[0], str):
            raise ConfigError(
                f"{path}: keys[{index}]: an x509-svid key needs 'x5c' with exactly one certificate"
            )
        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
        except (ValueError, binascii.Error) as exc:
            raise ConfigError(f"{path}: keys[{index}].x5c[0]: not a DER certificate") from exc
        authorities.append(cert)
    try:
        jwt_bundle = JwtBundle.from_jwks(trust_domain, data)
    except InvalidBundle as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    x509_bundle = X509Bundle(trust_domain, tuple(authorities)) if authorities else None
    return FederatedBundle(trust_domain, x509_bundle, jwt_bundle, str(path))


def load_federation(specs: Iterable[str], own: TrustDomain) -> tuple[FederatedBundle, ...]:
    """Load every ``TD=FILE`` option (``--federate``); reject the own trust domain and repeats."""
    bundles: dict[TrustDomain, FederatedBundle] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise ConfigError(f"--federate {spec!r}: want TRUST_DOMAIN=FILE")
        try:
            trust_domain = TrustDomain.parse(name)
        except InvalidSpiffeId as exc:
            raise ConfigError(f"--federate {spec!r}: {exc}") from exc
        if trust_domain == own:
            raise ConfigError(f"--federate {spec!r}: {own} is the provider's own trust domain")
        if trust_domain in bundles:
            raise ConfigError(f"--federate {spec!r}: trust domain {trust_domain} given twice")
        bundles[trust_domain] = load_federated_bundle(trust_domain, Path(file))
    return tuple(bundles.values())
