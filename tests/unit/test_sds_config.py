"""`sds run` configuration: every bad input is one line naming the file and key; exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from sds.bridge.config import load_config, parse_config, parse_config_text
from sds.errors import ConfigError
from tests.harness.mutate import mutations


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "listen: unix:///tmp/x.sock\nlisten_mode: 1\n",
            "sds.yaml: unknown field 'listen_mode' (want one of admin, allowed_gids, allowed_uids, "
            "default_svid, disable_spiffe_cert_validation, failover, jwt_svids, listen, metrics, "
            "names, per_caller, policies, secrets, socket_mode, trust_domain, upstream_backoff, "
            "workload_api)",
        ),
        (
            "listen: tcp://10.0.0.1:9000\n",
            "sds.yaml: listen: 'tcp://10.0.0.1:9000': TCP listening is allowed on loopback only "
            "(TCP callers cannot be identified; use a unix socket)",
        ),
        (
            "socket_mode: '0666'\n",
            "sds.yaml: socket_mode: '0666': must not grant access to others (at most '0660')",
        ),
        (
            "allowed_uids: [root]\n",
            "sds.yaml: allowed_uids: must be a list of non-negative integers",
        ),
        (
            "policies:\n  - name: p\n    allow: [spiffe://Example.org/x]\n",
            "sds.yaml: policies[0].allow[0]: trust domain 'Example.org' may contain only "
            "lower-case letters, digits, '.', '-' and '_'",
        ),
        (
            "policies:\n  - name: p\n    allow: ['spiffe://example.org/*/x']\n",
            "sds.yaml: policies[0].allow[0]: 'spiffe://example.org/*/x': '*' is allowed only "
            "as a final '/*'",
        ),
        (
            "policies:\n  - name: ROOTCA\n    allow: [spiffe://example.org/x]\n",
            "sds.yaml: policies[0].name: 'ROOTCA' is a built-in resource name",
        ),
        (
            "secrets:\n  - name: a\n    hint: x\n  - name: a\n    hint: y\n",
            "sds.yaml: secrets[1].name: 'a' is already used by secrets[0].name",
        ),
        ("default_svid: {}\n", "sds.yaml: default_svid: needs spiffe_id or hint"),
        ("names: {default_svid: ''}\n", "sds.yaml: names.default_svid: must not be empty"),
        (
            "listen: [unclosed\n",
            "sds.yaml: line 2: invalid YAML: did not find expected ',' or ']'",
        ),
        (
            "admin: 0.0.0.0:8181\n",
            "sds.yaml: admin: '0.0.0.0:8181': the admin endpoint listens on loopback only",
        ),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "sds.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).replace(str(path), "sds.yaml") == message


def test_good_config_round_trip() -> None:
    config = parse_config(
        {
            "workload_api": "unix:///run/spire.sock",
            "listen": "unix:///run/sds/sds.sock",
            "socket_mode": "0660",
            "allowed_uids": [101],
            "default_svid": {"hint": "external"},
            "policies": [{"name": "p", "allow": ["spiffe://td/a", "spiffe://td/ns/*"]}],
            "admin": "off",
        },
        "x.yaml",
    )
    assert config.socket_mode == 0o660
    assert config.policies[0].exact == ("spiffe://td/a",)
    assert config.policies[0].prefixes == ("spiffe://td/ns/",)
    assert config.admin.port is None
    assert config.default_svid is not None and config.default_svid.hint == "external"


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"listen: \xff\xfe\n", "sds.yaml: not UTF-8 (byte 8)"),
        (b"allowed_uids: [" + b"1" * 5000 + b"]\n", "sds.yaml: line 1: invalid YAML: integer "),
        (b"names: " + b"[" * 40 + b"\n", "sds.yaml: line 1: invalid YAML: nested deeper than 32"),
        (b"names: " + b"[" * 5000 + b"\n", "sds.yaml: line 1: invalid YAML: exceeded maximum"),
        (b"a:\n" + b"".join(b" " * i + b"- \n" for i in range(0, 80, 2)), "sds.yaml: line 3"),
        (
            b"policies: [{name: p, trust_domains: 5, allow: [spiffe://a/b]}]\n",
            "sds.yaml: policies[0].trust_domains: must be a list of trust domain names",
        ),
        (b"socket_mode: .inf\n", "sds.yaml: socket_mode: must be an octal string such as '0600'"),
        (
            b"socket_mode: '0o600'\n",
            "sds.yaml: socket_mode: must be an octal string such as '0600'",
        ),
        (
            b'workload_api: "unix:///run/a\\0.sock"\n',
            "sds.yaml: workload_api[0]: 'unix:///run/a\\x00.sock': must not contain control",
        ),
        (
            b'listen: "unix:///run/a\\0.sock"\n',
            "sds.yaml: listen: 'unix:///run/a\\x00.sock': must not contain control characters",
        ),
        (b"listen: tcp://127.0.0.1:" + b"9" * 5000 + b"\n", "sds.yaml: listen: 'tcp://127.0.0."),
        (b"admin: 127.0.0.1:+80\n", "sds.yaml: admin: '127.0.0.1:+80': want HOST:PORT on loopback"),
        (b"allowed_uids: [1, 1]\nallowed_uids: []\n", "sds.yaml: line 2: invalid YAML: duplicate"),
        (
            b"x: !!timestamp 2024-02-30\n",
            "sds.yaml: line 1: invalid YAML: tag tag:yaml.org,2002:timestamp is not allowed",
        ),
        (b"? [a]\n: 1\n", "sds.yaml: line 1: invalid YAML: a key must be a plain value"),
        (b"", "sds.yaml: is empty: a config file must be a non-empty mapping"),
        (b"# only a comment\n", "sds.yaml: is empty: a config file must be a non-empty mapping"),
        (b"{}\n", "sds.yaml: is empty: a config file must be a non-empty mapping"),
        (b"- a\n", "sds.yaml: want a mapping, got list"),
    ],
)
def test_hostile_config_is_one_line(tmp_path: Path, raw: bytes, message: str) -> None:
    path = tmp_path / "sds.yaml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value).replace(str(path), "sds.yaml")
    assert "\n" not in text
    assert text.startswith(message), text


def test_yaml_dates_stay_strings() -> None:
    config = parse_config_text(b"listen: unix:///s/s.sock\ndefault_svid: {hint: 2024-02-30}\n", "x")
    assert config.default_svid is not None and config.default_svid.hint == "2024-02-30"


def test_config_larger_than_the_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sds.yaml"
    path.write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: larger than 1048576 bytes"


@pytest.mark.hostile
def test_mutated_configs_raise_only_config_errors() -> None:
    """10,000 seeded mutations through the real parser: a config or one ConfigError line."""
    accepted = refused = 0
    for raw in mutations(10_000, seed=20261202):
        try:
            parse_config_text(raw, "fuzz.yaml")
        except ConfigError as exc:
            assert "\n" not in str(exc), (raw, str(exc))
            assert str(exc).startswith("fuzz.yaml: "), (raw, str(exc))
            refused += 1
        else:
            accepted += 1
    assert accepted + refused == 10_000
    assert refused > 5_000 and accepted > 100  # the mutations reach both outcomes


def test_control_characters_in_flags_are_refused() -> None:
    config = parse_config({"listen": "unix:///run/sds.sock"}, "x.yaml")
    with pytest.raises(ConfigError) as info:
        config.with_overrides(workload_api=["unix:///run/a\0b"])
    assert str(info.value) == (
        "--workload-api: 'unix:///run/a\\x00b': must not contain control characters"
    )
