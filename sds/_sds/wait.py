"""``sds wait``: block until the bridge is ready, for init containers and scripts.

Ready means the SDS socket accepts connections (``sds run`` binds it only
after the first valid X.509 context) or ``/readyz`` answers 200. Exit 0 when
ready, 1 on timeout with one line saying what was last seen.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--socket", metavar="unix:///PATH", help="wait until the SDS socket answers"
    )
    target.add_argument(
        "--admin", metavar="HOST:PORT", help="wait until http://HOST:PORT/readyz is 200"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")


def _probe_socket(path: str) -> str | None:
    import socket  # noqa: PLC0415

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        try:
            sock.connect(path)
        except FileNotFoundError:
            return "socket does not exist yet"
        except OSError as exc:
            return f"connect failed: {exc.strerror or exc}"
    return None


def _probe_admin(address: str) -> str | None:
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    try:
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=2) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return exc.read().decode(errors="replace").strip() or f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"admin endpoint not answering: {getattr(exc, 'reason', exc)}"


def run(args: argparse.Namespace) -> int:
    import sys  # noqa: PLC0415
    import time  # noqa: PLC0415

    from ..errors import ConfigError  # noqa: PLC0415

    if args.socket is not None:
        if not args.socket.startswith("unix://"):
            raise ConfigError(f"--socket {args.socket!r}: want unix:///path")
        path = args.socket[len("unix://") :]

        def probe() -> str | None:
            return _probe_socket(path)
    else:
        address = args.admin

        def probe() -> str | None:
            return _probe_admin(address)

    deadline = time.monotonic() + args.timeout
    while True:
        problem = probe()
        if problem is None:
            print("ready")
            return 0
        if time.monotonic() >= deadline:
            print(f"sds wait: not ready after {args.timeout:g}s: {problem}", file=sys.stderr)
            return 1
        time.sleep(0.2)
