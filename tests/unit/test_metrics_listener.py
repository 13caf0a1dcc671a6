"""The scrape listener (``metrics: IP:PORT``, ``--metrics``): probes and metrics, nothing else.

The tests here run in process, with no child process and no Envoy; the others are in
``tests/integration/test_metrics_listener.py``.
"""

from __future__ import annotations

import argparse

import pytest

from sds.bridge import app as command
from sds.bridge.config import MetricsConfig, parse_config
from sds.errors import ConfigError


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0:9102", MetricsConfig("0.0.0.0", 9102)),
        ("10.1.2.3:0", MetricsConfig("10.1.2.3", 0)),
        ("[::]:9102", MetricsConfig("::", 9102)),
        ("127.0.0.1:9102", MetricsConfig("127.0.0.1", 9102)),
        ("off", None),
    ],
)
def test_metrics_key_takes_any_ip(value: str, expected: MetricsConfig | None) -> None:
    assert parse_config({"metrics": value}, "sds.yaml").metrics == expected


def test_metrics_is_off_by_default_and_the_flag_wins() -> None:
    config = parse_config({"metrics": "127.0.0.1:1"}, "sds.yaml")
    assert parse_config({}, "sds.yaml").metrics is None
    assert config.with_overrides(metrics="0.0.0.0:9102").metrics == MetricsConfig(
        "0.0.0.0",
        9102,
    )
    assert config.with_overrides(metrics="off").metrics is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("localhost:9102", "sds.yaml: metrics: 'localhost:9102': want IP:PORT "),
        ("9102", "sds.yaml: metrics: '9102': want IP:PORT "),
        ("::1:9102", "sds.yaml: metrics: '::1:9102': write an IPv6 address in brackets"),
        ("0.0.0.0:70000", "sds.yaml: metrics: '0.0.0.0:70000': port out of range"),
        (9102, "sds.yaml: metrics: want a string, got integer"),
    ],
)
def test_bad_metrics_values_name_the_key(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"metrics": value}, "sds.yaml")
    assert str(info.value).startswith(message)


def test_metrics_flag_is_registered() -> None:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert parser.parse_args(["--metrics", "0.0.0.0:9102"]).metrics == "0.0.0.0:9102"
