"""The provider's parsers against bad and hostile input: one-line ConfigError, never a crash."""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from sds._util.duration import parse_duration
from sds.errors import ConfigError
from sds.provider.app import _socket_mode
from sds.provider.ca import LocalCA
from sds.provider.identities import (
    load_federated_bundle,
    load_identities,
    parse_federated_bundle,
    parse_identities,
)
from sds.spiffe.id import TrustDomain
from tests.harness.identity_cases import IDENTITY_CASES
from tests.harness.provider import write_identities

pytestmark = pytest.mark.hostile

TD = TrustDomain("example.org")

OTHER = TrustDomain("other.org")

HEADER = {"workload.spiffe.io": "true"}

RICH = """\
kind: workload_identity
version: v1
metadata:
  name: web
  description: the web tier
  labels: {team: a, tier: "1"}
  expires: 2030-01-01T00:00:00Z
spec:
  spiffe:
    id: /svc/web
    hint: web
    x509: {dns_sans: [web.local, "*.web.local"], ip_sans: [10.0.0.1, "::1"], maximum_ttl: 30m}
    jwt: {maximum_ttl: 5m}
  rules:
    allow:
      - conditions:
          - attribute: workload.unix.uid
            eq: {value: 1000}
          - attribute: workload.unix.gid
            in: {values: [1, "2", 3]}
      - conditions:
          - {attribute: workload.unix.pid, not_in: {values: [1]}}
---
kind: workload_identity
version: v1
metadata: {name: db}
spec:
  spiffe: {id: /svc/db}
"""


@pytest.mark.parametrize("case", sorted(IDENTITY_CASES))
def test_bad_identities_file_is_one_config_error(tmp_path: Path, case: str) -> None:
    content, message = IDENTITY_CASES[case]
    path = tmp_path / "ids.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_identities(path, TD)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(message.format(f=path)), text
    if not message.endswith(": "):
        assert text == message.format(f=path)


def test_fifo_as_identities_file_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "ids.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as info:
        load_identities(fifo, TD)
    assert str(info.value) == f"{fifo}: not a regular file"
    with pytest.raises(ConfigError) as info:
        load_federated_bundle(OTHER, fifo)
    assert str(info.value) == f"{fifo}: not a regular file"


def test_oversized_identities_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ids.yaml"
    path.write_bytes(b"#" * (4 * 1024 * 1024 + 1))
    with pytest.raises(ConfigError) as info:
        load_identities(path, TD)
    assert str(info.value) == f"{path}: larger than 4194304 bytes"


def test_deeply_nested_jwks_is_a_config_error() -> None:
    data = b'{"keys": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    with pytest.raises(ConfigError) as info:
        parse_federated_bundle(OTHER, data, "f.json")
    assert str(info.value) == "f.json: not JSON: nested too deeply"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("99999999999h", "duration '99999999999h' is longer than 87600h"),
        ("9" * 400 + "h", "is longer than 87600h"),
        ("1e9h", "invalid duration '1e9h' (want e.g. 30s, 5m, 1h30m)"),
    ],
)
def test_durations_out_of_range_are_value_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_duration(text)
    assert message in str(info.value)


@pytest.mark.parametrize("text", ["6_6_6", "0o600", "7777", "-600", " 600", "6" * 5000, ""])
def test_bad_socket_modes(text: str) -> None:
    with pytest.raises(ConfigError):
        _socket_mode(text)


TOKENS = [
    "2024-02-30",
    "9" * 5000,
    "[" * 60,  # the parsers' deep-nesting cases are tested above; kept short for speed
    "{" * 60,
    "\xff",
    "\x00",
    "{{",
    "spiffe://",
    ": ",
    "\n- ",
    "null",
    ".inf",
    "-1",
    "&a ",
    "*a",
    "!!binary ",
    "!!python/object:os.system ",
    "<<: *a",
    "\n---\n",
    "'",
    '"',
    "\t",
    "%YAML 1.1\n",
    "9999-12-31T23:59:59Z",
    "1e400",
    "99999999999h",
    "0x10",
    "\u202e",
]


def _jwks() -> bytes:
    ca = LocalCA.ephemeral(OTHER)
    doc = json.loads(ca.jwt_bundle.to_jwks())
    der = ca.bundle.authorities[0].public_bytes(serialization.Encoding.DER)
    doc["keys"].append({"use": "x509-svid", "kty": "EC", "x5c": [base64.b64encode(der).decode()]})
    return json.dumps(doc).encode()


def mutate(rng: random.Random, data: bytes, tokens: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        at = rng.randrange(len(out) + 1)
        if choice < 0.3 and out:
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif choice < 0.6:
            out[at:at] = rng.choice(tokens)
        elif choice < 0.8 and out:
            end = min(len(out), at + rng.randint(1, 40))
            del out[at:end]
        else:
            end = min(len(out), at + rng.randint(1, 60))
            out[at:at] = out[at:end]
    return bytes(out)


def test_fuzz_parsers_raise_only_config_errors() -> None:
    rng = random.Random(20261202)
    tokens = [t.encode("utf-8", "surrogatepass") for t in TOKENS]
    # PyYAML's pure-Python parser costs ~2 ms a document here, so the identities
    # share is sized to keep the whole run within seconds.
    seeds = {
        "identities": [RICH.split("---", maxsplit=1)[0].encode(), RICH.split("---\n")[1].encode()],
        "jwks": [_jwks()],
        "pem": [LocalCA.ephemeral(OTHER).bundle.pem()],
    }
    counts = {"identities": 3000, "jwks": 4500, "pem": 1500}
    failures: list[str] = []
    accepted = rejected = 0
    for kind, n in counts.items():
        for case in range(n):
            data = mutate(rng, rng.choice(seeds[kind]), tokens)
            try:
                if kind == "identities":
                    parse_identities(data.decode("utf-8", "replace"), TD, "f.yaml")
                else:
                    parse_federated_bundle(OTHER, data, "f")
                accepted += 1
            except ConfigError as exc:
                rejected += 1
                if "\n" in str(exc):
                    failures.append(f"{kind}#{case}: multi-line: {str(exc)[:200]!r}")
            except Exception as exc:
                failures.append(f"{kind}#{case}: {type(exc).__name__}: {str(exc)[:200]}")
    cli = 0
    for case in range(1000):
        seed, parse = rng.choice([(b"1h30m", parse_duration), (b"600", _socket_mode)])
        text = mutate(rng, seed, tokens).decode("utf-8", "replace")
        cli += 1
        try:
            parse(text)
        except (ValueError, ConfigError):  # parse_duration's contract is ValueError
            pass
        except Exception as exc:
            failures.append(f"cli#{case}: {type(exc).__name__}: {str(exc)[:200]}")
    assert failures == [], f"{len(failures)} non-ConfigError outcomes, first: {failures[:5]}"
    assert accepted + rejected + cli == 10_000
    assert rejected > 1000 and accepted > 100  # the mutations are neither all fatal nor all inert


CLI_VALUES: dict[str, tuple[list[str], str]] = {
    "NUL in --identities": (["--identities", "a\0b"], "'a\\x00b': cannot read: embedded null byte"),
    "device as --identities": (["--identities", "/dev/null"], "/dev/null: not a regular file"),
    "NUL in --federate": (
        ["--federate", "other.org=a\0b"],
        "'a\\x00b': cannot read: embedded null byte",
    ),
    "NUL in --trust-domain": (["--trust-domain", "exa\0mple.org"], "--trust-domain: "),
    "huge --jwt-ttl": (["--jwt-ttl", "9" * 5000 + "s"], "--jwt-ttl: duration '999"),
    "NUL in --socket": (
        ["--socket", "/tmp/a\0b"],
        "'/tmp/a\\x00b': a socket path cannot contain NUL",
    ),
    "NUL in --state-dir": (
        ["--state-dir", "/tmp/a\0b"],
        "'/tmp/a\\x00b': a directory path cannot contain NUL",
    ),
}


@pytest.mark.parametrize("case", sorted(CLI_VALUES))
def test_hostile_cli_values_exit_2_with_one_line(
    case: str, tmp_path: Path, sockdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sds.cli import main

    ids = write_identities(tmp_path)
    override, message = CLI_VALUES[case]
    options = {
        "--socket": str(sockdir / "w.sock"),
        "--trust-domain": "example.org",
        "--identities": str(ids),
    }
    extra: list[str] = []
    for flag, value in zip(override[::2], override[1::2], strict=True):
        if flag in options:
            options[flag] = value
        else:
            extra += [flag, value]
    if "--state-dir" not in extra:
        extra.append("--ephemeral")
    argv = ["workload-api", *[x for pair in options.items() for x in pair], *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"sds workload-api: {message}"), err
