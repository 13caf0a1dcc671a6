"""Identities files (Teleport ``workload_identity`` shape), rules, durations and federation."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from sds._util.duration import parse_duration
from sds._util.peercred import PeerCredentials
from sds.errors import ConfigError
from sds.provider import identities as identities_module
from sds.provider.ca import LocalCA
from sds.provider.identities import (
    Condition,
    Identity,
    Rule,
    entitled,
    load_federated_bundle,
    load_federation,
    load_identities,
    parse_identities,
)
from sds.spiffe.id import SpiffeId, TrustDomain
from tests.conftest import captured_log

DATA = Path(__file__).parents[1] / "data" / "identities"
TD = TrustDomain("example.org")
HEAD = "kind: workload_identity\nversion: v1\nmetadata: {name: web}\n"
SPEC = "spec:\n  spiffe: {id: /svc/web}\n"


def creds(uid: int = 1000, gid: int = 1000, pid: int = 4242) -> PeerCredentials:
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


def with_condition(condition: str) -> str:
    """A document whose only rule has a valid first condition and ``condition`` second."""
    return (
        HEAD + "spec:\n  spiffe: {id: /svc/web}\n  rules:\n    allow:\n      - conditions:\n"
        "          - {attribute: workload.unix.uid, eq: {value: 1}}\n"
        f"          - {condition}\n"
    )


@pytest.fixture
def provider_log() -> Iterator[list[logging.LogRecord]]:
    """Records logged on ``sds.provider`` (independent of propagation settings)."""
    with captured_log("sds.provider", lambda record: record) as records:
        yield records


# ---------------------------------------------------------------------------
# Loading valid files


def test_teleport_file_loads_every_field(provider_log: list[logging.LogRecord]) -> None:
    identities_module._warned.clear()
    loaded = load_identities(DATA / "teleport.yaml", TD)
    assert [i.name for i in loaded] == ["web", "db", "everyone"]
    web, db, everyone = loaded
    assert web.spiffe_id == SpiffeId.parse("spiffe://example.org/svc/web")
    assert web.hint == "web"
    assert web.description == "front end"
    assert dict(web.labels) == {"team": "payments"}
    assert web.dns_sans == ("web.internal", "*.web.internal")
    assert web.ip_sans == ("10.0.0.7", "fd00::7")
    assert web.x509_ttl == dt.timedelta(minutes=30)
    assert web.jwt_ttl == dt.timedelta(minutes=2)
    assert web.rules == (
        Rule(
            (
                Condition("workload.unix.uid", "eq", frozenset({1000})),
                Condition("workload.unix.gid", "not_in", frozenset({0, 4})),
            )
        ),
        Rule((Condition("workload.unix.uid", "in", frozenset({2000, 2001})),)),
    )
    assert web.source == f"{DATA / 'teleport.yaml'}: document 1"
    assert db.expires == dt.datetime(2099, 1, 1, tzinfo=dt.UTC)
    assert db.x509_ttl is None and db.jwt_ttl is None
    assert everyone.rules == ()
    assert everyone.spiffe_id == SpiffeId.parse("spiffe://example.org/shared/everyone")
    warnings = [r.getMessage() for r in provider_log if r.levelno == logging.WARNING]
    assert warnings == [
        "identity.field_ignored identity=db field=spec.spiffe.x509.subject_template "
        f'source="{DATA / "teleport.yaml"}: document 2" '
        'reason="X.509 subject templates are not implemented"',
        "identity.field_ignored identity=db field=spec.spiffe.jwt.extra_claims "
        f'source="{DATA / "teleport.yaml"}: document 2" '
        'reason="extra JWT claims are not implemented"',
    ]
    # Accept-but-warn warns once, not on every reload.
    load_identities(DATA / "teleport.yaml", TD)
    assert len([r for r in provider_log if r.levelno == logging.WARNING]) == 2


def test_directory_is_read_in_file_name_order_and_ignores_other_files() -> None:
    loaded = load_identities(DATA / "dir", TD)
    assert [i.name for i in loaded] == ["web", "web-admin", "db"]
    assert loaded[1].rules == ()


def test_empty_documents_are_skipped_but_counted() -> None:
    text = "---\n" + HEAD + SPEC + "---\n---\n" + HEAD.replace("web", "db") + SPEC + "foo: 1\n"
    with pytest.raises(ConfigError) as info:
        parse_identities(text, TD, "ids.yaml")
    assert str(info.value) == (
        "ids.yaml: document 3: unknown field 'foo' "
        "(want one of kind, metadata, spec, sub_kind, version)"
    )


def test_duplicate_spiffe_ids_are_allowed(tmp_path: Path) -> None:
    path = tmp_path / "ids.yaml"
    path.write_text(HEAD + SPEC + "---\n" + HEAD.replace("web", "web2") + SPEC)
    loaded = load_identities(path, TD)
    assert [str(i.spiffe_id) for i in loaded] == ["spiffe://example.org/svc/web"] * 2


# ---------------------------------------------------------------------------
# Errors: one line naming file, document and field


ERRORS = {
    "bad YAML": (
        HEAD + SPEC + "---\nkind: workload_identity\nmetadata: {name: [x\n",
        "ids.yaml: document 2: line 9: invalid YAML: expected ',' or ']', but got '<stream end>'",
    ),
    "tab in YAML": (
        "kind: workload_identity\n\tversion: v1\n",
        "ids.yaml: document 1: line 2: invalid YAML: found character '\\t' that cannot start "
        "any token",
    ),
    "duplicate key": (
        HEAD + SPEC + "kind: x\n",
        "ids.yaml: document 1: line 6: invalid YAML: duplicate key 'kind'",
    ),
    "not a mapping": ("- a\n- b\n", "ids.yaml: document 1: want a mapping, got list"),
    "unknown top-level field": (
        HEAD + SPEC + "status: {}\n",
        "ids.yaml: document 1: unknown field 'status' "
        "(want one of kind, metadata, spec, sub_kind, version)",
    ),
    "unknown nested field": (
        HEAD + "spec:\n  spiffe: {id: /svc/web, foo: 1}\n",
        "ids.yaml: document 1: spec.spiffe: unknown field 'foo' (want one of hint, id, jwt, x509)",
    ),
    "unknown x509 field": (
        HEAD + "spec:\n  spiffe: {id: /svc/web, x509: {dns: [a]}}\n",
        "ids.yaml: document 1: spec.spiffe.x509: unknown field 'dns' "
        "(want one of dns_sans, ip_sans, maximum_ttl, subject_template)",
    ),
    "wrong kind": (
        "kind: role\nversion: v1\nmetadata: {name: web}\n" + SPEC,
        "ids.yaml: document 1: kind: want 'workload_identity', got 'role'",
    ),
    "wrong version": (
        "kind: workload_identity\nversion: v2\nmetadata: {name: web}\n" + SPEC,
        "ids.yaml: document 1: version: want 'v1', got 'v2'",
    ),
    "missing metadata": (
        "kind: workload_identity\nversion: v1\n" + SPEC,
        "ids.yaml: document 1: metadata: required",
    ),
    "missing name": (
        "kind: workload_identity\nversion: v1\nmetadata: {labels: {a: b}}\n" + SPEC,
        "ids.yaml: document 1: metadata.name: required",
    ),
    "missing spec": (HEAD, "ids.yaml: document 1: spec: required"),
    "missing spiffe id": (
        HEAD + "spec:\n  spiffe: {hint: web}\n",
        "ids.yaml: document 1: spec.spiffe.id: required",
    ),
    "relative SPIFFE path": (
        HEAD + "spec:\n  spiffe: {id: svc/web}\n",
        "ids.yaml: document 1: spec.spiffe.id: SPIFFE ID path 'svc/web' must start with '/'",
    ),
    "empty SPIFFE path segment": (
        HEAD + "spec:\n  spiffe: {id: /svc//web}\n",
        "ids.yaml: document 1: spec.spiffe.id: SPIFFE ID '/svc//web' has an empty path segment",
    ),
    "bad SPIFFE path character": (
        HEAD + "spec:\n  spiffe: {id: '/svc/we b'}\n",
        "ids.yaml: document 1: spec.spiffe.id: SPIFFE ID '/svc/we b': path segment 'we b' "
        "may contain only letters, digits, '.', '-' and '_'",
    ),
    "Teleport template": (
        HEAD + "spec:\n  spiffe: {id: '/svc/{{ user.name }}'}\n",
        "ids.yaml: document 1: spec.spiffe.id: templates are not supported, "
        "got '/svc/{{ user.name }}'",
    ),
    "unknown attribute": (
        with_condition("{attribute: workload.unix.user, eq: {value: 1}}"),
        "ids.yaml: document 1: spec.rules.allow[0].conditions[1].attribute: unknown attribute "
        "'workload.unix.user' (want one of workload.unix.gid, workload.unix.pid, "
        "workload.unix.uid)",
    ),
    "missing attribute": (
        with_condition("{eq: {value: 1}}"),
        "ids.yaml: document 1: spec.rules.allow[0].conditions[1].attribute: required",
    ),
    "unknown operator": (
        with_condition("{attribute: workload.unix.uid, gt: {value: 1}}"),
        "ids.yaml: document 1: spec.rules.allow[0].conditions[1]: unknown operator 'gt' "
        "(want one of eq, in, not_eq, not_in)",
    ),
    "no operator": (
        with_condition("{attribute: workload.unix.uid}"),
        "ids.yaml: document 1: spec.rules.allow[0].conditions[1]: want exactly one operator "
        "of eq, in, not_eq, not_in, got none",
    ),
    "two operators": (
        with_condition("{attribute: workload.unix.uid, eq: {value: 1}, in: {values: [1]}}"),
        "ids.yaml: document 1: spec.rules.allow[0].conditions[1]: want exactly one operator "
        "of eq, in, not_eq, not_in, got eq and in",
    ),
    "non-integer value": (
        with_condition("{attribute: workload.unix.uid, eq: {value: alice}}"),
        "ids.yaml: document 1: spec.rules.allow[0].conditions[1].eq.value: want a "
        "non-negative integer or numeric string, got 'alice'",
    ),
    "negative value": (
        with_condition("{attribute: workload.unix.uid, eq: {value: -1}}"),
        "ids.yaml: document 1: spec.rules.allow[0].conditions[1].eq.value: want a "
        "non-negative integer or numeric string, got -1",
    ),
    "boolean value": (
        with_condition("{attribute: workload.unix.uid, not_eq: {value: true}}"),
        "ids.yaml: document 1: spec.rules.allow[0].conditions[1].not_eq.value: want a "
        "non-negative integer or numeric string, got True",
    ),
    "bad list item": (
        with_condition("{attribute: workload.unix.gid, in: {values: [1, 2x]}}"),
        "ids.yaml: document 1: spec.rules.allow[0].conditions[1].in.values[1]: want a "
        "non-negative integer or numeric string, got '2x'",
    ),
    "values not a list": (
        with_condition("{attribute: workload.unix.gid, not_in: {values: 5}}"),
        "ids.yaml: document 1: spec.rules.allow[0].conditions[1].not_in.values: want a list, "
        "got integer",
    ),
    "eq with values": (
        with_condition("{attribute: workload.unix.gid, eq: {values: [5]}}"),
        "ids.yaml: document 1: spec.rules.allow[0].conditions[1].eq: unknown field 'values' "
        "(want one of value)",
    ),
    "eq without value": (
        with_condition("{attribute: workload.unix.gid, eq: {}}"),
        "ids.yaml: document 1: spec.rules.allow[0].conditions[1].eq.value: required",
    ),
    "rule expression": (
        HEAD + "spec:\n  spiffe: {id: /svc/web}\n  rules: {allow: [{expression: 'true'}]}\n",
        "ids.yaml: document 1: spec.rules.allow[0].expression: rule expressions are not "
        "supported; use conditions",
    ),
    "deny rules": (
        HEAD + "spec:\n  spiffe: {id: /svc/web}\n  rules: {deny: []}\n",
        "ids.yaml: document 1: spec.rules: unknown field 'deny' (want one of allow)",
    ),
    "allow not a list": (
        HEAD + "spec:\n  spiffe: {id: /svc/web}\n  rules: {allow: {conditions: []}}\n",
        "ids.yaml: document 1: spec.rules.allow: want a list, got mapping",
    ),
    "numeric TTL": (
        HEAD + "spec:\n  spiffe: {id: /svc/web, x509: {maximum_ttl: 10}}\n",
        "ids.yaml: document 1: spec.spiffe.x509.maximum_ttl: want a duration string like 30s, "
        "5m or 1h30m, got integer",
    ),
    "bad TTL unit": (
        HEAD + "spec:\n  spiffe: {id: /svc/web, jwt: {maximum_ttl: 1d}}\n",
        "ids.yaml: document 1: spec.spiffe.jwt.maximum_ttl: invalid duration '1d' "
        "(want e.g. 30s, 5m, 1h30m)",
    ),
    "TTL below one second": (
        HEAD + "spec:\n  spiffe: {id: /svc/web, x509: {maximum_ttl: 500ms}}\n",
        "ids.yaml: document 1: spec.spiffe.x509.maximum_ttl: must be at least 1s",
    ),
    "bad IP SAN": (
        HEAD + "spec:\n  spiffe: {id: /svc/web, x509: {ip_sans: [10.0.0.300]}}\n",
        "ids.yaml: document 1: spec.spiffe.x509.ip_sans[0]: not an IP address: '10.0.0.300'",
    ),
    "bad DNS SAN": (
        HEAD + "spec:\n  spiffe: {id: /svc/web, x509: {dns_sans: ['a b']}}\n",
        "ids.yaml: document 1: spec.spiffe.x509.dns_sans[0]: not a DNS name: 'a b'",
    ),
    "hint not a string": (
        HEAD + "spec:\n  spiffe: {id: /svc/web, hint: 5}\n",
        "ids.yaml: document 1: spec.spiffe.hint: want a string, got integer",
    ),
    "label not a string": (
        "kind: workload_identity\nversion: v1\nmetadata: {name: web, labels: {a: 1}}\n" + SPEC,
        "ids.yaml: document 1: metadata.labels.a: want a string, got integer",
    ),
    "bad expiry": (
        "kind: workload_identity\nversion: v1\nmetadata: {name: web, expires: soon}\n" + SPEC,
        "ids.yaml: document 1: metadata.expires: want an RFC 3339 timestamp, got 'soon'",
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_malformed_document_names_file_document_and_field(case: str) -> None:
    text, message = ERRORS[case]
    with pytest.raises(ConfigError) as info:
        parse_identities(text, TD, "ids.yaml")
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_duplicate_names_across_files_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(HEAD + SPEC)
    (tmp_path / "b.yaml").write_text(HEAD.replace("web", "db") + SPEC + "---\n" + HEAD + SPEC)
    with pytest.raises(ConfigError) as info:
        load_identities(tmp_path, TD)
    assert str(info.value) == (
        f"{tmp_path / 'b.yaml'}: document 2: metadata.name: duplicate name 'web' "
        f"(first in {tmp_path / 'a.yaml'}: document 1)"
    )


def test_unusable_sources_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^.*/missing\.yaml: cannot read: No such file"):
        load_identities(tmp_path / "missing.yaml", TD)
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    with pytest.raises(ConfigError) as info:
        load_identities(tmp_path / "empty.yaml", TD)
    assert str(info.value) == f"{tmp_path / 'empty.yaml'}: no workload_identity documents"
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError) as info:
        load_identities(tmp_path / "sub", TD)
    assert str(info.value) == f"{tmp_path / 'sub'}: directory has no *.yaml or *.yml files"
    (tmp_path / "latin1.yaml").write_bytes(b"kind: \xe9\n")
    with pytest.raises(ConfigError) as info:
        load_identities(tmp_path / "latin1.yaml", TD)
    assert str(info.value) == f"{tmp_path / 'latin1.yaml'}: not UTF-8 text"


# ---------------------------------------------------------------------------
# Rule engine, with explicit kernel credentials


def identity(*rules: Rule, expires: dt.datetime | None = None) -> Identity:
    return Identity("id", SpiffeId.parse("spiffe://example.org/x"), rules=rules, expires=expires)


def cond(attribute: str, operator: str, *values: int) -> Condition:
    return Condition(f"workload.unix.{attribute}", operator, frozenset(values))


@pytest.mark.parametrize(
    ("condition", "caller", "expected"),
    [
        (cond("uid", "eq", 1000), creds(uid=1000), True),
        (cond("uid", "eq", 1000), creds(uid=1001), False),
        (cond("uid", "not_eq", 1000), creds(uid=1000), False),
        (cond("uid", "not_eq", 1000), creds(uid=1001), True),
        (cond("gid", "in", 10, 20), creds(gid=20), True),
        (cond("gid", "in", 10, 20), creds(gid=30), False),
        (cond("gid", "not_in", 10, 20), creds(gid=10), False),
        (cond("gid", "not_in", 10, 20), creds(gid=30), True),
        (cond("pid", "eq", 4242), creds(pid=4242), True),
        (cond("pid", "eq", 4242), creds(pid=4243), False),
        (cond("gid", "in"), creds(), False),
        (cond("gid", "not_in"), creds(), True),
    ],
)
def test_condition_operators(condition: Condition, caller: PeerCredentials, expected: bool) -> None:
    assert condition.matches(caller) is expected


def test_rule_needs_all_conditions_identity_needs_any_rule() -> None:
    uid_and_gid = Rule((cond("uid", "eq", 1000), cond("gid", "eq", 50)))
    pid_only = Rule((cond("pid", "in", 1, 2),))
    subject = identity(uid_and_gid, pid_only)
    assert subject.entitles(creds(uid=1000, gid=50, pid=99))
    assert not subject.entitles(creds(uid=1000, gid=51, pid=99))
    assert subject.entitles(creds(uid=5, gid=5, pid=2))
    assert not subject.entitles(creds(uid=5, gid=5, pid=3))


def test_no_rules_or_empty_rule_entitle_everyone() -> None:
    assert identity().entitles(creds(uid=0))
    assert identity(Rule(())).entitles(creds(uid=12345))


def test_numeric_strings_in_files_match_integers() -> None:
    loaded = load_identities(DATA / "teleport.yaml", TD)
    names = [i.name for i in entitled(loaded, creds(uid=1000, gid=1000))]
    assert names == ["web", "db", "everyone"]
    assert [i.name for i in entitled(loaded, creds(uid=1000, gid=4))] == ["db", "everyone"]
    assert [i.name for i in entitled(loaded, creds(uid=0, gid=0))] == ["everyone"]
    assert [i.name for i in entitled(loaded, creds(uid=2001, gid=0))] == ["web", "db", "everyone"]


def test_expired_identity_is_not_issued() -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    subject = identity(expires=now + dt.timedelta(seconds=1))
    assert subject.entitles(creds(), now)
    assert not subject.entitles(creds(), now + dt.timedelta(seconds=1))


# ---------------------------------------------------------------------------
# Durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h", 3600), ("1h30m", 5400), ("1.5h", 5400), ("500ms", 0.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "5", "1d", "m5", "1h 30m", "-1s", "0s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


# ---------------------------------------------------------------------------
# Federation files


OTHER = TrustDomain("other.org")


def test_federated_pem_bundle(tmp_path: Path) -> None:
    other = LocalCA.ephemeral(OTHER)
    path = tmp_path / "other.pem"
    path.write_bytes(other.bundle.pem())
    fed = load_federated_bundle(OTHER, path)
    assert fed.trust_domain == OTHER
    assert fed.x509 is not None and fed.x509.der() == other.bundle.der()
    assert fed.jwt is None


def spiffe_jwks(ca: LocalCA) -> bytes:
    """A SPIFFE bundle: the CA certificate as an x509-svid key plus the JWT keys."""
    doc = json.loads(ca.jwt_bundle.to_jwks())
    cert = ca.bundle.authorities[0]
    der = cert.public_bytes(serialization.Encoding.DER)
    x509_key = json.loads(LocalCA.ephemeral(ca.trust_domain).jwt_bundle.to_jwks())["keys"][0]
    x509_key.update(use="x509-svid", x5c=[base64.b64encode(der).decode()], kid="x509")
    doc["keys"].append(x509_key)
    doc["spiffe_refresh_hint"] = 300
    return json.dumps(doc).encode()


def test_federated_spiffe_jwks_bundle(tmp_path: Path) -> None:
    other = LocalCA.ephemeral(OTHER)
    path = tmp_path / "other.json"
    path.write_bytes(spiffe_jwks(other))
    fed = load_federated_bundle(OTHER, path)
    assert fed.x509 is not None and fed.x509.der() == other.bundle.der()
    assert fed.jwt is not None and fed.jwt.to_jwks() == other.jwt_bundle.to_jwks()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello", "{path}: neither PEM certificates nor a SPIFFE bundle JWKS"),
        (
            b"{not json",
            "{path}: not JSON: Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1)",
        ),
        (b'{"kids": []}', "{path}: SPIFFE bundle JWKS has no 'keys' list"),
        (
            b'{"keys": [{"use": "x509-svid", "kty": "EC"}]}',
            "{path}: keys[0]: an x509-svid key needs 'x5c' with exactly one certificate",
        ),
        (
            b'{"keys": [{"use": "x509-svid", "x5c": ["AAAA"]}]}',
            "{path}: keys[0].x5c[0]: not a DER certificate",
        ),
        (
            b'{"keys": [{"use": "jwt-svid", "kty": "EC", "crv": "P-256"}]}',
            "{path}: JWT bundle for spiffe://other.org: keys[0] has no 'kid'",
        ),
    ],
)
def test_bad_federation_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bundle"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_federated_bundle(OTHER, path)
    assert str(info.value) == message.format(path=path)


def test_federation_options(tmp_path: Path) -> None:
    pem = tmp_path / "other.pem"
    pem.write_bytes(LocalCA.ephemeral(OTHER).bundle.pem())
    loaded = load_federation([f"spiffe://other.org={pem}"], TD)
    assert [f.trust_domain for f in loaded] == [OTHER]
    cases = {
        "other.org": "--federate 'other.org': want TRUST_DOMAIN=FILE",
        f"Other.org={pem}": f"--federate 'Other.org={pem}': trust domain 'Other.org' may "
        "contain only lower-case letters, digits, '.', '-' and '_'",
        f"example.org={pem}": f"--federate 'example.org={pem}': example.org is the provider's "
        "own trust domain",
    }
    for spec, message in cases.items():
        with pytest.raises(ConfigError) as info:
            load_federation([spec], TD)
        assert str(info.value) == message
    with pytest.raises(ConfigError) as info:
        load_federation([f"other.org={pem}", f"other.org={pem}"], TD)
    assert str(info.value) == f"--federate 'other.org={pem}': trust domain other.org given twice"
