"""The ``sds`` command: one subcommand per job, each implemented in its own module.

Subcommand modules are imported only when chosen, so ``sds run`` does not pay
for the provider's code and vice versa. Each module exposes
``add_arguments(parser)`` and ``run(args) -> int``. Exit codes: 0 success,
1 runtime failure, 2 bad configuration or usage.

The global options (``--log-level``, ``--log-format``) are accepted before
or after the subcommand: ``sds --log-level DEBUG run`` and ``sds run
--log-level DEBUG`` mean the same; given in both places, the later one wins.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from sds import __version__
from sds._util.log import LOG_FORMATS, configure_logging
from sds.errors import ConfigError, SdsError

__all__ = ["main"]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "workload-api": ("sds.provider.app", "serve the embedded SPIFFE Workload API"),
    "inspect": ("sds.tools.inspect", "print what a Workload API (or our SDS server) hands out"),
    "run": ("sds.bridge.app", "serve Envoy SDS from the Workload API"),
    "wait": ("sds.tools.wait", "block until a bridge is ready"),
    "envoy-bootstrap": (
        "sds.tools.bootstrap.command",
        "generate an Envoy sidecar bootstrap that uses this bridge",
    ),
    "demo": ("sds.tools.demo", "run the whole mTLS topology on this machine and explain it"),
    "version": ("sds.tools.version", "print the versions of sds, Python and its main libraries"),
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _add_global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """``--log-level``/``--log-format``; a subcommand's copy only overrides when given."""

    def default(value: str) -> str:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--log-level",
        default=default("INFO"),
        choices=LOG_LEVELS,
        type=str.upper,
        help="log events at this level and above (default INFO)",
    )
    parser.add_argument(
        "--log-format",
        default=default("logfmt"),
        choices=LOG_FORMATS,
        help="logfmt lines or one JSON object per line (default logfmt)",
    )


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered.

    With ``only``, just that subcommand's module is imported and given its options;
    the others are listed (for ``sds --help``) without loading their modules, so
    ``sds run`` never imports the provider, the demo or the bootstrap generator.
    """
    parser = argparse.ArgumentParser(
        prog="sds", description="SPIFFE Workload API to Envoy SDS bridge."
    )
    parser.add_argument("--version", action="version", version=f"sds {__version__}")
    _add_global_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            importlib.import_module(module).add_arguments(command)
        _add_global_options(command, defaults=False)
        command.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sds`` command line; return the process exit code."""
    words = sys.argv[1:] if argv is None else list(argv)
    # The first word naming a command is the command: global options take no such value.
    chosen = next((w for w in words if w in COMMANDS), None)
    args = build_parser(chosen).parse_args(words)
    configure_logging(args.log_level, args.log_format)
    try:
        code: int = importlib.import_module(args._module).run(args)
    except ConfigError as exc:
        print(f"sds {args.command}: {exc}", file=sys.stderr)
        return 2
    except SdsError as exc:
        print(f"sds {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
