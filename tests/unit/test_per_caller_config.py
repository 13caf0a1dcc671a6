"""per_caller and workload-scoped policies in the bridge config: parsed, refused, applied."""

from __future__ import annotations

import datetime as dt

import pytest

from sds.bridge.config import PerCaller, parse_config, widened_keys
from sds.bridge.names import build_specs
from sds.errors import ConfigError
from sds.provider.ca import LocalCA
from sds.spiffe.id import SpiffeId, TrustDomain
from sds.spiffe.match import IdPattern
from sds.spiffe.x509 import BundleSet, X509Context
from sds.xds.resources import ValidationSpec

PROD = "spiffe://example.org/ns/prod/*"
DEV = "spiffe://example.org/ns/dev/*"


def _policies(extra: list[dict[str, object]] | None = None) -> dict[str, object]:
    return {
        "listen": "unix:///tmp/x.sock",
        "policies": [
            {"name": "peers", "allow": [PROD], "workloads": [PROD]},
            {"name": "peers", "allow": [DEV], "workloads": [DEV]},
            {"name": "peers", "allow": ["spiffe://example.org/nobody"]},
            *(extra or []),
        ],
    }


def test_per_caller_takes_one_address_or_a_list() -> None:
    one = parse_config({"per_caller": {"delegated_identity_api": "unix:///run/a.sock"}}, "s.yaml")
    assert one.per_caller == PerCaller(("unix:///run/a.sock",))
    two = parse_config(
        {"per_caller": {"delegated_identity_api": ["unix:///run/a.sock", "unix:///run/b.sock"]}},
        "s.yaml",
    )
    assert two.per_caller == PerCaller(("unix:///run/a.sock", "unix:///run/b.sock"))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"per_caller": {}},
            "s.yaml: per_caller: needs delegated_identity_api (the agent's admin socket)",
        ),
        (
            {"per_caller": {"delegated_identity_api": []}},
            "s.yaml: per_caller.delegated_identity_api: is empty: give the Delegated Identity "
            "API's address",
        ),
        (
            {"per_caller": {"delegated_identity_api": "unix:///a", "attest": "pid"}},
            "s.yaml: per_caller: unknown field 'attest' (want one of delegated_identity_api, "
            "max_callers)",
        ),
        (
            {
                "workload_api": ["unix:///run/agent.sock"],
                "per_caller": {"delegated_identity_api": "unix:///run/admin.sock"},
            },
            "s.yaml: per_caller: cannot be combined with workload_api: in per-caller mode "
            "every caller is served its own identity, never the bridge's",
        ),
    ],
)
def test_bad_per_caller_is_one_line(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "s.yaml")
    assert str(caught.value) == message


def test_max_callers_is_bounded() -> None:
    given = {"delegated_identity_api": "unix:///a.sock", "max_callers": 3}
    assert parse_config({"per_caller": given}, "s.yaml").per_caller == PerCaller(
        ("unix:///a.sock",), 3
    )
    for bad in (0, 65537, True, "10"):
        with pytest.raises(ConfigError) as caught:
            parse_config({"per_caller": {**given, "max_callers": bad}}, "s.yaml")
        assert str(caught.value) == (
            "s.yaml: per_caller.max_callers: must be an integer from 1 to 65536"
        )


def test_bad_delegated_address_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^s\.yaml: per_caller\.delegated_identity_api: "):
        parse_config({"per_caller": {"delegated_identity_api": "http://x"}}, "s.yaml")


def test_workload_api_flag_cannot_be_added_to_per_caller() -> None:
    config = parse_config({"per_caller": {"delegated_identity_api": "unix:///a.sock"}}, "s.yaml")
    with pytest.raises(ConfigError) as caught:
        config.with_overrides(workload_api=["unix:///b.sock"])
    assert str(caught.value) == (
        "--workload-api cannot be combined with per_caller: in per-caller mode every caller "
        "is served its own identity, never the bridge's"
    )


def test_policies_for_picks_the_first_entry_that_applies() -> None:
    config = parse_config(_policies(), "s.yaml")
    prod = config.policies_for("spiffe://example.org/ns/prod/web")
    dev = config.policies_for("spiffe://example.org/ns/dev/web")
    other = config.policies_for("spiffe://example.org/ns/test/web")
    nobody = config.policies_for(None)
    assert [p.prefixes for p in prod] == [("spiffe://example.org/ns/prod/",)]
    assert [p.prefixes for p in dev] == [("spiffe://example.org/ns/dev/",)]
    assert [p.exact for p in other] == [("spiffe://example.org/nobody",)]
    assert [p.exact for p in nobody] == [("spiffe://example.org/nobody",)]
    # /ns/prod itself is not below /ns/prod/
    assert [p.exact for p in config.policies_for("spiffe://example.org/ns/prod")] == [
        ("spiffe://example.org/nobody",)
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            [{"name": "peers", "allow": [PROD], "workloads": [PROD]}],
            "s.yaml: policies[3].name: 'peers' can never apply: policies[2] (no workloads) "
            "already applies to every workload",
        ),
    ],
)
def test_unreachable_policy_entries_are_refused(
    extra: list[dict[str, object]], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_policies(extra), "s.yaml")
    assert str(caught.value) == message


def test_same_workloads_twice_is_refused_and_secrets_stay_unique() -> None:
    data = {
        "policies": [
            {"name": "peers", "allow": [PROD], "workloads": [PROD]},
            {"name": "peers", "allow": [DEV], "workloads": [PROD]},
        ]
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "s.yaml")
    assert str(caught.value) == (
        "s.yaml: policies[1].name: 'peers' can never apply: policies[0] has the same "
        f"workloads ({PROD})"
    )
    clash = {
        "secrets": [{"name": "peers", "spiffe_id": "spiffe://example.org/a"}],
        "policies": [{"name": "peers", "allow": [PROD], "workloads": [PROD]}],
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(clash, "s.yaml")
    assert str(caught.value) == (
        "s.yaml: policies[0].name: 'peers' is already used by secrets[0].name"
    )


@pytest.mark.parametrize(
    ("workloads", "message"),
    [
        ([], "s.yaml: policies[0].workloads: is empty; leave it out to mean every workload"),
        (["spiffe://example.org/a*"], "s.yaml: policies[0].workloads[0]: "),
    ],
)
def test_bad_workloads_name_the_entry(workloads: list[str], message: str) -> None:
    data = {"policies": [{"name": "p", "allow": [PROD], "workloads": workloads}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "s.yaml")
    assert str(caught.value).startswith(message)


def test_specs_carry_the_policy_of_the_default_svids_workload() -> None:
    config = parse_config(_policies(), "s.yaml")
    td = TrustDomain.parse("example.org")
    ca = LocalCA.ephemeral(td)
    for spiffe_id, allowed in (
        ("spiffe://example.org/ns/prod/web", ((), ("spiffe://example.org/ns/prod/",))),
        ("spiffe://example.org/ns/dev/web", ((), ("spiffe://example.org/ns/dev/",))),
        ("spiffe://example.org/ns/qa/web", (("spiffe://example.org/nobody",), ())),
    ):
        svid = ca.issue_x509_svid(SpiffeId.parse(spiffe_id), dt.timedelta(hours=1))
        spec = build_specs(X509Context((svid,), BundleSet([ca.bundle])), config)["peers"]
        assert isinstance(spec, ValidationSpec)
        assert (spec.exact, spec.prefixes) == allowed


def test_narrowing_one_scoped_entry_is_not_widening_but_removing_one_is() -> None:
    old = parse_config(_policies(), "s.yaml")
    new = parse_config(
        {"policies": [p for p in _policies()["policies"] if p.get("workloads") != [DEV]]},  # type: ignore[union-attr]
        "s.yaml",
    )
    assert widened_keys(old, new) == [(f"policies[peers for {DEV}]", f"allow={DEV}", "removed")]
    assert widened_keys(new, old) == []


def test_id_pattern_matches() -> None:
    prefix = IdPattern.parse(PROD)
    assert prefix.matches(str(SpiffeId.parse("spiffe://example.org/ns/prod/a")))
    assert not prefix.matches("spiffe://example.org/ns/production")
    exact = IdPattern.parse("spiffe://example.org/a")
    assert exact.matches("spiffe://example.org/a")
    assert not exact.matches("spiffe://example.org/a/b")
