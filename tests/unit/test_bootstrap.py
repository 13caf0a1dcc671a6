"""``sds envoy-bootstrap``: flag checks, the generated config, Envoy validation, real traffic.

The traffic test runs the provider, two bridges (the server side presents
``web``, the client side ``client-a``) and real Envoys built from generated
bootstraps: plain HTTP to the client Envoy's loopback listener reaches the
app behind the server Envoy over mTLS, and the refusals (caller not allowed,
server not expected) happen in the TLS handshake.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from sds import cli
from sds.bridge.config import parse_config
from sds.tools import bootstrap as _bootstrap
from tests.harness.bootstrap_flags import (
    BASE,
    CLIENT_A,
    INBOUND,
    OUTBOUND,
    TD,
    WEB,
    example_files,
    generate,
    is_snippet,
    parse,
)


def listener(config: dict[str, Any], name: str) -> dict[str, Any]:
    found = [item for item in config["static_resources"]["listeners"] if item["name"] == name]
    assert len(found) == 1, name
    return found[0]


def cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    found = [item for item in config["static_resources"]["clusters"] if item["name"] == name]
    assert len(found) == 1, name
    return found[0]


def network_filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    config_ = listener(config, name)["filter_chains"][0]["filters"][0]["typed_config"]
    assert isinstance(config_, dict)
    return config_


def tls_context(item: dict[str, Any]) -> dict[str, Any]:
    if "filter_chains" in item:
        item = item["filter_chains"][0]
    context: dict[str, Any] = item["transport_socket"]["typed_config"]["common_tls_context"]
    return context


@pytest.fixture
def sds_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the subcommand as cli.py will (the lead adds it to COMMANDS)."""
    monkeypatch.setitem(
        cli.COMMANDS,
        "envoy-bootstrap",
        ("sds.tools.bootstrap", "generate an Envoy sidecar bootstrap"),
    )


BAD_FLAGS = [
    pytest.param(
        [*BASE, "--outbound", "0.0.0.0:9001=server:8443", "--expect", WEB],
        "--outbound '0.0.0.0:9001=server:8443': the local listener must be on a loopback IP "
        "such as 127.0.0.1 (the app's plaintext traffic must not leave the host)",
        id="outbound-not-loopback",
    ),
    pytest.param(
        [*BASE, "--outbound", "localhost:9001=server:8443", "--expect", WEB],
        "--outbound 'localhost:9001=server:8443': the local listener must be on a loopback IP "
        "such as 127.0.0.1 (the app's plaintext traffic must not leave the host)",
        id="outbound-hostname",
    ),
    pytest.param(
        [*BASE, "--inbound", "8443:127.0.0.1:8080"],
        "--inbound needs --allow SPIFFE_ID (or --allow-any-in-trust-domain): "
        "an open inbound listener is not a safe default",
        id="missing-allow",
    ),
    pytest.param(
        [*BASE, "--inbound", "8443:127.0.0.1:8080", "--allow", "spiffe://Example.org/x"],
        "--allow 'spiffe://Example.org/x': trust domain 'Example.org' may contain only "
        "lower-case letters, digits, '.', '-' and '_'",
        id="bad-allow-id",
    ),
    pytest.param(
        [*BASE, "--inbound", "8443:127.0.0.1:8080", "--allow", "spiffe://example.org/a*"],
        "--allow 'spiffe://example.org/a*': '*' is allowed only as a final '/*'",
        id="bad-allow-wildcard",
    ),
    pytest.param(
        [*BASE, "--outbound", "127.0.0.1:9001=server:8443", "--expect", "example.org/web"],
        "--expect 'example.org/web': SPIFFE ID 'example.org/web' must start with 'spiffe://'",
        id="bad-expect-id",
    ),
    pytest.param(
        [*BASE, "--outbound", "127.0.0.1:9001=server:8443"],
        "--outbound '127.0.0.1:9001=server:8443': needs --expect SPIFFE_ID after it "
        "(no unverified upstreams)",
        id="outbound-without-expect",
    ),
    pytest.param(
        [*BASE, "--expect", WEB, "--outbound", "127.0.0.1:9001=server:8443"],
        f"--expect '{WEB}': must follow the --outbound it belongs to",
        id="expect-first",
    ),
    pytest.param(
        [*BASE, *OUTBOUND, "--outbound", "127.0.0.1:9002=other:8443"],
        "--outbound '127.0.0.1:9002=other:8443': needs --expect SPIFFE_ID after it "
        "(no unverified upstreams)",
        id="second-outbound-without-expect",
    ),
    pytest.param(
        [*BASE, "--outbound", "127.0.0.1:9001=server", "--expect", WEB],
        "--outbound '127.0.0.1:9001=server': want HOST:PORT, got 'server'",
        id="remote-without-port",
    ),
    pytest.param(
        [*BASE, "--outbound", "127.0.0.1:9001=server:0", "--expect", WEB],
        "--outbound '127.0.0.1:9001=server:0': port '0' must be a number from 1 to 65535",
        id="remote-port-zero",
    ),
    pytest.param(
        [*BASE, "--inbound", "8443:app", "--allow", CLIENT_A],
        "--inbound '8443:app': want HOST:PORT, got 'app'",
        id="inbound-malformed",
    ),
    pytest.param(
        [*BASE, "--admin-port", "9901", "--inbound", "9901:127.0.0.1:8080", "--allow", CLIENT_A],
        "--inbound: port 9901 is already used by --admin-port",
        id="port-clash",
    ),
    pytest.param(
        [*BASE, *OUTBOUND, "--admin-socket", "admin.sock"],
        "--admin-socket 'admin.sock': must be an absolute path",
        id="relative-admin-socket",
    ),
    pytest.param(
        [*BASE, *OUTBOUND, "--admin-socket", "/run/envoy/a.sock", "--admin-port", "9901"],
        "--admin-socket and --admin-port exclude each other",
        id="admin-socket-and-port",
    ),
    pytest.param(
        ["--sds-socket", "/s.sock", *OUTBOUND], "--node-id is required", id="missing-node-id"
    ),
    pytest.param(
        ["--node-id", "n", "--sds-socket", "sds.sock", *OUTBOUND],
        "--sds-socket 'sds.sock': must be an absolute path",
        id="relative-socket",
    ),
    pytest.param(
        [*BASE, *OUTBOUND, "--allow", CLIENT_A],
        "--allow and --allow-any-in-trust-domain need --inbound",
        id="allow-without-inbound",
    ),
    pytest.param(
        [*BASE, *INBOUND, "--allow-any-in-trust-domain"],
        "--allow-any-in-trust-domain and --allow exclude each other",
        id="allow-and-any",
    ),
    pytest.param(
        [*BASE, *INBOUND, "--policy-name", "ROOTCA"],
        "--policy-name 'ROOTCA': want letters, digits, '.', '-', '_' and not a built-in name "
        "(default, ROOTCA, ALL)",
        id="builtin-policy-name",
    ),
    pytest.param(
        [*BASE, *OUTBOUND, "--max-connection-duration", "10m"],
        "--max-connection-duration '10m': want whole seconds, e.g. 600 or 600s",
        id="bad-duration",
    ),
    pytest.param(
        [*BASE, *OUTBOUND, "--bridge-config", "/nonexistent/policy.yaml"],
        "--bridge-config: no bridge policy to write (needs --inbound with --allow)",
        id="bridge-config-without-policy",
    ),
    pytest.param(BASE, "nothing to generate: give --inbound and/or --outbound", id="nothing"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_FLAGS)
def test_bad_flags_exit_2_with_one_line(
    sds_cli: None, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert cli.main(["envoy-bootstrap", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"sds envoy-bootstrap: {message}\n"


def test_cli_writes_the_bootstrap_and_the_bridge_snippet(
    sds_cli: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    snippet, output = tmp_path / "policy.yaml", tmp_path / "envoy.yaml"
    argv = [*BASE, *INBOUND, "--bridge-config", str(snippet), "-o", str(output)]
    assert cli.main(["envoy-bootstrap", *argv]) == 0
    assert capsys.readouterr() == ("", "")
    assert output.read_text() == _bootstrap.render_bootstrap(generate(*argv)[0])
    assert snippet.read_text().startswith(_bootstrap.SNIPPET_MARKER)

    # The snippet is a valid bridge config: the policy the listener asks for.
    config = parse_config(yaml.safe_load(snippet.read_text()), "snippet")
    (policy,) = config.policies
    assert policy.name == "inbound-allow"
    assert [td.name for td in policy.trust_domains] == ["example.org"]
    assert policy.exact == (CLIENT_A,)
    assert policy.prefixes == (f"{TD}/ns/prod/",)

    # Regenerating overwrites our own snippet, never a file we did not write.
    assert cli.main(["envoy-bootstrap", *argv]) == 0
    snippet.write_text("listen: unix:///run/sds/sds.sock\n")
    assert cli.main(["envoy-bootstrap", *argv]) == 2
    assert capsys.readouterr().err == (
        f"sds envoy-bootstrap: --bridge-config '{snippet}': exists and is not a snippet written "
        "by sds envoy-bootstrap; not overwriting it (merge the policy yourself)\n"
    )
    assert snippet.read_text() == "listen: unix:///run/sds/sds.sock\n"


def test_stdout_output_notes_the_policy_the_bridge_needs(
    sds_cli: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["envoy-bootstrap", *BASE, *INBOUND, "--policy-name", "web-callers"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["node"] == {"id": "node-1", "cluster": "node-1"}
    assert "#   allow:\n#   - spiffe://example.org/client-a\n" in out
    assert err == (
        "sds envoy-bootstrap: note: the bridge config must contain policy 'web-callers' "
        "(see the header, or use --bridge-config FILE)\n"
    )


def test_admin_port_warns_that_any_local_user_can_stop_envoy(
    sds_cli: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["envoy-bootstrap", *BASE, *OUTBOUND, "--admin-port", "9901"]) == 0
    out, err = capsys.readouterr()
    assert err == (
        "sds envoy-bootstrap: warning: --admin-port puts Envoy's admin on TCP 127.0.0.1:9901, "
        "where every local user can stop Envoy (POST /quitquitquit); the default is a 0600 "
        "unix socket (--admin-socket)\n"
    )
    assert "# WARNING: admin on TCP 127.0.0.1:9901 (--admin-port): every local user can\n" in out
    assert yaml.safe_load(out)["admin"] == {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}
    }


def test_admin_is_a_0600_unix_socket_by_default() -> None:
    options, config = generate(*BASE, *OUTBOUND)
    assert config["admin"] == {
        "address": {"pipe": {"path": "/run/envoy/admin.sock", "mode": 0o600}}
    }
    text = _bootstrap.render_bootstrap(options)
    assert "# Admin: unix socket /run/envoy/admin.sock, mode 0600 (Envoy's uid only; its\n" in text
    assert "port_value: 9901" not in text
    options, config = generate(*BASE, *OUTBOUND, "--admin-socket", "unix:///run/e/admin.sock")
    assert config["admin"]["address"] == {"pipe": {"path": "/run/e/admin.sock", "mode": 0o600}}
    command = _bootstrap.command_line(options)
    assert "--admin-socket /run/e/admin.sock" in command
    assert generate(*shlex.split(command)[2:])[0] == options


def test_http_inbound_enforces_the_policy_in_handshake_and_rbac() -> None:
    _, config = generate(*BASE, *INBOUND)
    inbound = listener(config, "inbound")
    assert inbound["address"] == {"socket_address": {"address": "0.0.0.0", "port_value": 8443}}
    tls = inbound["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    context = tls_context(inbound)
    assert [s["name"] for s in context["tls_certificate_sds_secret_configs"]] == ["default"]
    assert context["validation_context_sds_secret_config"]["name"] == "inbound-allow"

    hcm = network_filter(config, "inbound")
    assert hcm["forward_client_cert_details"] == "SANITIZE_SET"
    assert hcm["set_current_client_cert_details"] == {"uri": True}
    assert hcm["common_http_protocol_options"]["max_connection_duration"] == "600s"
    rbac, router = hcm["http_filters"]
    assert router["name"] == "envoy.filters.http.router"
    rules = rbac["typed_config"]["rules"]
    assert rules["action"] == "ALLOW"
    assert rules["policies"]["spiffe-callers"]["principals"] == [
        {"authenticated": {"principal_name": {"exact": CLIENT_A}}},
        {"authenticated": {"principal_name": {"prefix": f"{TD}/ns/prod/"}}},
    ]
    app = cluster(config, "inbound_app")
    assert app["type"] == "STATIC"
    assert app["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "127.0.0.1", "port_value": 8080}
    }


def test_allow_any_in_trust_domain_uses_rootca_without_rbac() -> None:
    argv = [*BASE, "--inbound", "8443:127.0.0.1:8080", "--allow-any-in-trust-domain"]
    options, config = generate(*argv)
    assert tls_context(listener(config, "inbound"))["validation_context_sds_secret_config"][
        "name"
    ] == ("ROOTCA")
    assert [f["name"] for f in network_filter(config, "inbound")["http_filters"]] == [
        "envoy.filters.http.router"
    ]
    assert _bootstrap.bridge_policy(options) is None
    assert "admits ANY workload of the bridge's own trust domain" in _bootstrap.render_bootstrap(
        options
    )


def test_tcp_uses_tcp_proxy_and_handshake_admission_only() -> None:
    options, config = generate(*BASE, "--protocol", "tcp", *INBOUND, *OUTBOUND)
    for name in ("inbound", "outbound_0"):
        proxy = listener(config, name)["filter_chains"][0]["filters"][0]
        assert proxy["name"] == "envoy.filters.network.tcp_proxy"
        assert proxy["typed_config"]["max_downstream_connection_duration"] == "600s"
    assert tls_context(listener(config, "inbound"))["validation_context_sds_secret_config"][
        "name"
    ] == ("inbound-allow")
    assert "typed_extension_protocol_options" not in cluster(config, "outbound_0")
    assert "admission is decided in the TLS handshake only" in _bootstrap.render_bootstrap(options)


def test_outbound_pins_the_server_id_with_a_combined_validation_context() -> None:
    _, config = generate(
        *BASE,
        *OUTBOUND,
        "--outbound",
        "127.0.0.1:9002=10.0.0.7:443",
        "--expect",
        "spiffe://partner.example/api",
        "--expect",
        f"{TD}/ns/prod/*",
    )
    out0 = listener(config, "outbound_0")
    assert out0["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 9001}}
    assert "transport_socket" not in out0["filter_chains"][0]
    assert network_filter(config, "outbound_0")["forward_client_cert_details"] == "SANITIZE"

    first, second = cluster(config, "outbound_0"), cluster(config, "outbound_1")
    assert first["type"] == "STRICT_DNS"
    assert first["transport_socket"]["typed_config"]["sni"] == "server.example"
    assert second["type"] == "STATIC"
    assert "sni" not in second["transport_socket"]["typed_config"]
    combined = tls_context(first)["combined_validation_context"]
    assert combined["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": WEB}}
    ]
    assert combined["validation_context_sds_secret_config"]["name"] == TD
    combined = tls_context(second)["combined_validation_context"]
    assert combined["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://partner.example/api"}},
        {"san_type": "URI", "matcher": {"prefix": f"{TD}/ns/prod/"}},
    ]
    assert combined["validation_context_sds_secret_config"]["name"] == "ALL"
    options = first["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert options["common_http_protocol_options"]["max_connection_duration"] == "600s"
    assert "auto_config" in options


def test_sds_source_admin_and_timeouts() -> None:
    _, config = generate(
        *BASE,
        *INBOUND,
        *OUTBOUND,
        "--api-type",
        "delta",
        "--initial-fetch-timeout",
        "10s",
        "--max-connection-duration",
        "0",
        "--admin-port",
        "19000",
    )
    assert config["admin"] == {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 19000}}
    }
    sds = cluster(config, "sds")
    assert sds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "pipe": {"path": "/run/sds/sds.sock"}
    }
    text = json.dumps(config)
    assert text.count('"api_type": "DELTA_GRPC"') == 4  # two secrets per TLS context
    assert '"GRPC"' not in text
    assert text.count('"initial_fetch_timeout": "10s"') == 4
    assert "max_connection_duration" not in text
    assert "max_downstream_connection_duration" not in text


def test_yaml_quotes_values_envoy_would_read_as_booleans() -> None:
    options, config = generate("--node-id", "n", "--node-cluster", "on", *BASE[2:], *OUTBOUND)
    text = _bootstrap.render_bootstrap(options)
    assert "  id: 'n'\n  cluster: 'on'\n" in text
    assert config["node"] == {"id": "n", "cluster": "on"}


def test_command_line_in_the_header_regenerates_the_same_bootstrap() -> None:
    argv = [
        *BASE,
        "--protocol",
        "tcp",
        *INBOUND,
        "--inbound-address",
        "10.1.2.3",
        "--policy-name",
        "callers",
        *OUTBOUND,
        "--outbound",
        "[::1]:9002=[2001:db8::1]:443",
        "--expect",
        f"{TD}/db",
        "--api-type",
        "delta",
        "--admin-port",
        "0",
        "--request-timeout",
        "0",
    ]
    options, _ = generate(*argv)
    command = _bootstrap.command_line(options)
    again, _ = generate(*shlex.split(command)[2:])
    assert again == options
    assert _bootstrap.render_bootstrap(options).splitlines()[1] == f"#   {command}"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--jwks-uri", "http://127.0.0.1:1/jwks/td"],
            "--jwks-uri needs --inbound and --jwt-audience",
        ),
        (
            ["--jwt-audience", "a", "--jwks-uri", "http://10.0.0.1:8181/jwks/td"],
            "--jwks-uri 'http://10.0.0.1:8181/jwks/td': "
            "the bridge's JWKS is served on loopback only",
        ),
    ],
)
def test_bad_jwt_flags(extra: list[str], message: str) -> None:
    from sds.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        generate(*BASE, *INBOUND, *extra)
    assert str(info.value) == message


def test_examples_exist_and_are_current() -> None:
    """Every example bootstrap is exactly what its header command generates today."""
    bootstraps = [p for p in example_files() if not is_snippet(p)]
    assert len(bootstraps) >= 4
    for path in bootstraps:
        text = path.read_text()
        command = text.splitlines()[1].removeprefix("#   ")
        argv = shlex.split(command)
        assert argv[:2] == ["sds", "envoy-bootstrap"], path
        options = _bootstrap.options_from_args(parse(*argv[2:]))
        assert _bootstrap.render_bootstrap(options) == text, f"{path.name} is stale"
    snippets = [p for p in example_files() if is_snippet(p)]
    assert snippets
    for path in snippets:
        assert parse_config(yaml.safe_load(path.read_text()), path.name).policies
