"""Self-tests of the Envoy harness (tests/harness/envoy.py) and TLS clients (tlsclient.py).

The tests here run in process, with no child process and no Envoy; the others are in
``tests/e2e/test_envoy_harness.py``.
"""

from __future__ import annotations

import pytest

from tests.harness.envoy import EnvoyError, envoy_binary, envoy_versions

pytestmark = pytest.mark.timeout(60)


def test_envoy_versions_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDS_TEST_ENVOY_VERSIONS", " 1.40.0 ,1.36.4,,1.40.0")
    params = envoy_versions()
    assert [p.values for p in params] == [("1.40.0",), ("1.36.4",)]
    assert [p.id for p in params] == ["envoy-1.40.0", "envoy-1.36.4"]
    monkeypatch.delenv("SDS_TEST_ENVOY_VERSIONS")
    assert [p.values[0] for p in envoy_versions()] == ["1.40.0", "1.36.4"]


def test_envoy_binary_rejects_a_malformed_version() -> None:
    with pytest.raises(EnvoyError, match=r"^Envoy version '1.36; rm' is not of the form X.Y.Z$"):
        envoy_binary("1.36; rm")
