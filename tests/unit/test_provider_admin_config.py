"""The provider's admin-socket options: SPIRE's directory rule and authorized delegates."""

from __future__ import annotations

import pytest

from sds.errors import ConfigError
from sds.provider.app import MSG_ADMIN_DIR, admin_socket_path, authorized_delegates
from sds.spiffe.id import SpiffeId, TrustDomain

TD = TrustDomain("example.org")


@pytest.mark.parametrize(
    ("admin", "workload"),
    [
        ("/run/spire/admin.sock", "/run/spire/agent.sock"),  # the same directory
        ("/run/spire/sub/admin.sock", "/run/spire/agent.sock"),  # below it
        ("/run/other/../spire/admin.sock", "/run/spire/agent.sock"),  # the same, once cleaned
        ("/run/spire/agent.sock", "/run/spire/agent.sock"),  # the Workload API socket itself
    ],
)
def test_admin_socket_in_or_under_the_workload_socket_dir_is_refused(
    admin: str, workload: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        admin_socket_path(admin, workload)
    assert str(caught.value) == MSG_ADMIN_DIR


@pytest.mark.parametrize(
    ("admin", "workload"),
    [
        ("/run/spire-admin/admin.sock", "/run/spire/agent.sock"),  # a sibling sharing a prefix
        ("/run/admin.sock", "/run/spire/agent.sock"),  # the parent directory
    ],
)
def test_admin_socket_elsewhere_is_accepted_and_made_absolute(admin: str, workload: str) -> None:
    assert admin_socket_path(admin, workload) == admin


def test_relative_paths_are_compared_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/tmp")
    with pytest.raises(ConfigError):
        admin_socket_path("admin.sock", "/tmp/agent.sock")
    assert admin_socket_path("a/admin.sock", "/tmp/b/agent.sock") == "/tmp/a/admin.sock"


def test_authorized_delegates_are_spiffe_ids_of_the_trust_domain() -> None:
    assert authorized_delegates(["spiffe://example.org/node/bridge"], TD) == (
        SpiffeId.parse("spiffe://example.org/node/bridge"),
    )
    with pytest.raises(ConfigError) as foreign:
        authorized_delegates(["spiffe://other.org/bridge"], TD)
    assert str(foreign.value) == (
        "--authorized-delegate 'spiffe://other.org/bridge': not in the trust domain example.org"
    )
    with pytest.raises(ConfigError) as bad:
        authorized_delegates(["bridge"], TD)
    assert str(bad.value) == (
        "--authorized-delegate 'bridge': SPIFFE ID 'bridge' must start with 'spiffe://'"
    )
