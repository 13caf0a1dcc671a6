"""`sds run` configuration: every bad input is one line naming the file and key; exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sds._sds.config import load_config, parse_config
from sds.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "listen: unix:///tmp/x.sock\nlisten_mode: 1\n",
            "sds.yaml: listen_mode: unknown key (allowed: admin, allowed_gids, allowed_uids, "
            "default_svid, disable_spiffe_cert_validation, failover, listen, names, policies, "
            "secrets, "
            "socket_mode, trust_domain, workload_api)",
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
        ("names: {default_svid: ''}\n", "sds.yaml: names.default_svid: must be a non-empty string"),
        (
            "listen: [unclosed\n",
            "sds.yaml: line 2: invalid YAML: expected ',' or ']', but got '<stream end>'",
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


def test_cli_exits_2_with_the_line(tmp_path: Path) -> None:
    path = tmp_path / "sds.yaml"
    path.write_text("listen: unix:///tmp/x.sock\nbogus: 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "sds", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"sds run: {path}: bogus: unknown key (allowed: admin, allowed_gids, allowed_uids, "
        "default_svid, disable_spiffe_cert_validation, failover, listen, names, policies, "
        "secrets, "
        "socket_mode, trust_domain, workload_api)"
    ]


def test_missing_listen_is_reported() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sds", "run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "sds run: no SDS listen address: set listen in the config or pass --listen"
    )


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
