"""``sds inspect``: print what a SPIFFE Workload API hands out (like ``tbot spiffe-inspect``).

Shows the caller's X.509-SVIDs (SPIFFE ID, hint, serial, expiry, DNS and IP
SANs), the X.509 trust bundles, a JWT-SVID per identity when ``--audience``
is given (the token truncated, since it is a bearer credential, unless
``--show-token``), and the JWT bundles; ``--json`` prints the same data as one JSON
object. Exit codes: 0 success; 1 the Workload API is unreachable, refuses the
caller, or hands out material that fails validation (one line on stderr:
``sds inspect: <reason>``); 2 a bad address or option.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sds.workloadapi.address import Address

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``inspect`` options."""
    parser.add_argument(
        "--path",
        metavar="ADDR",
        default=None,
        help="Workload API address, unix:///path or tcp://ip:port "
        "(default: $SPIFFE_ENDPOINT_SOCKET)",
    )
    parser.add_argument(
        "--audience",
        action="append",
        default=[],
        metavar="AUD",
        help="also fetch JWT-SVIDs for this audience (repeat for several)",
    )
    parser.add_argument(
        "--show-token",
        action="store_true",
        help="print JWT-SVIDs whole (default: truncated; a token is a bearer credential)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="give up after this long (default 5)",
    )
    parser.add_argument(
        "--sds",
        metavar="unix:///PATH",
        help="instead, connect to an SDS server as Envoy does and show what it serves",
    )
    parser.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="NAME",
        help="with --sds: secret names to ask for (default: default, ROOTCA, ALL)",
    )
    parser.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="with --sds: also show each connected Envoy's ACKed versions from the bridge admin",
    )


def run(args: argparse.Namespace) -> int:
    """Fetch and print; return the exit code (ConfigError for a bad address or timeout)."""
    import asyncio  # noqa: PLC0415
    import json  # noqa: PLC0415

    from sds.errors import ConfigError, InvalidMaterial, WorkloadApiError  # noqa: PLC0415
    from sds.workloadapi.address import parse_address  # noqa: PLC0415

    if args.sds:
        return _run_sds(args)
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be a positive number of seconds, not {args.timeout}")
    address = parse_address(args.path, option="--path")
    try:
        report = asyncio.run(collect(address, args.audience, args.timeout))
    except (WorkloadApiError, InvalidMaterial) as exc:
        print(f"sds inspect: {exc}", file=sys.stderr)
        return 1
    if not args.show_token:
        for svid in report["jwt_svids"] or ():
            svid["token"] = truncate_token(svid["token"])
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        sys.stdout.write(render(report))
    return 0


TOKEN_SHOWN = 16  # characters of a JWT-SVID printed without --show-token


def truncate_token(token: str) -> str:
    """The first TOKEN_SHOWN characters of a bearer token and its length, never the whole."""
    return f"{token[:TOKEN_SHOWN]}... ({len(token)} chars; --show-token prints it)"


async def collect(address: Address, audience: list[str], timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
    """Everything the Workload API at ``address`` hands this caller, as JSON-ready data.

    Raises WorkloadApiError (WorkloadApiUnavailable when nothing answers
    within ``timeout`` seconds) or InvalidMaterial.
    """
    import asyncio  # noqa: PLC0415

    from sds.errors import WorkloadApiUnavailable  # noqa: PLC0415
    from sds.spiffe.x509 import utc_text  # noqa: PLC0415
    from sds.workloadapi.client import WorkloadApiClient  # noqa: PLC0415

    try:
        async with asyncio.timeout(timeout), WorkloadApiClient(address) as client:
            ctx = await client.fetch_x509_context()
            bundles = await client.fetch_x509_bundles()
            jwt_svids = await client.fetch_jwt_svids(audience) if audience else None
            jwt_bundles = await client.fetch_jwt_bundles()
    except TimeoutError:
        raise WorkloadApiUnavailable(
            f"workload API at {address} did not answer within {timeout:g}s"
        ) from None
    return {
        "address": str(address),
        "x509_svids": [
            {
                "spiffe_id": str(svid.spiffe_id),
                "hint": svid.hint,
                "serial": format(svid.serial, "x"),
                "not_after": utc_text(svid.not_after),
                "dns_sans": svid.dns_sans(),
                "ip_sans": svid.ip_sans(),
            }
            for svid in ctx.svids
        ],
        "x509_bundles": [
            {"trust_domain": td.name, "ca_count": len(bundle.authorities)}
            for td, bundle in bundles.items()
        ],
        "jwt_audience": list(audience),
        "jwt_svids": None
        if jwt_svids is None
        else [
            {
                "spiffe_id": str(svid.spiffe_id),
                "hint": svid.hint,
                "expiry": utc_text(svid.expiry),
                "token": svid.token,
            }
            for svid in jwt_svids
        ],
        "jwt_bundles": [
            {"trust_domain": td.name, "key_ids": sorted(bundles_for_td.keys)}
            for td, bundles_for_td in sorted(jwt_bundles.items())
        ],
    }


def render(report: dict[str, Any]) -> str:
    """The human-readable form of a :func:`collect` report."""
    lines = [f"Workload API: {report['address']}"]

    def none_if_empty(items: list[Any]) -> None:
        if not items:
            lines.append("  (none)")

    svids = report["x509_svids"]
    lines.append(f"X.509-SVIDs: {len(svids)}")
    none_if_empty(svids)
    for svid in svids:
        lines += [
            f"  {svid['spiffe_id']}",
            f"    hint:      {svid['hint'] or '(none)'}",
            f"    serial:    {svid['serial']}",
            f"    not after: {svid['not_after']}",
            f"    DNS SANs:  {', '.join(svid['dns_sans']) or '(none)'}",
            f"    IP SANs:   {', '.join(svid['ip_sans']) or '(none)'}",
        ]
    bundles = report["x509_bundles"]
    lines.append(f"X.509 trust bundles: {len(bundles)}")
    none_if_empty(bundles)
    for bundle in bundles:
        count = bundle["ca_count"]
        lines.append(f"  {bundle['trust_domain']}: {count} CA certificate{'s' * (count != 1)}")
    if report["jwt_svids"] is not None:
        audience = ", ".join(report["jwt_audience"])
        lines.append(f"JWT-SVIDs for audience {audience}: {len(report['jwt_svids'])}")
        none_if_empty(report["jwt_svids"])
        for svid in report["jwt_svids"]:
            lines += [
                f"  {svid['spiffe_id']}",
                f"    hint:   {svid['hint'] or '(none)'}",
                f"    expiry: {svid['expiry']}",
                f"    token:  {svid['token']}",
            ]
    jwt_bundles = report["jwt_bundles"]
    lines.append(f"JWT bundles: {len(jwt_bundles)}")
    none_if_empty(jwt_bundles)
    for bundle in jwt_bundles:
        lines.append(
            f"  {bundle['trust_domain']}: key IDs {', '.join(bundle['key_ids']) or '(none)'}"
        )
    return "\n".join(lines) + "\n"


def _run_sds(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415
    import json  # noqa: PLC0415

    from sds.errors import ConfigError, SdsError  # noqa: PLC0415
    from sds.tools.inspect_sds import DEFAULT_NAMES, collect_sds, render_sds  # noqa: PLC0415
    from sds.workloadapi.address import unix_socket_path  # noqa: PLC0415

    try:
        path = unix_socket_path(args.sds)
    except ValueError as exc:
        raise ConfigError(f"--sds {args.sds!r}: {exc}") from None
    names = args.name or list(DEFAULT_NAMES)
    try:
        report = asyncio.run(collect_sds(path, names, args.admin, args.timeout))
    except SdsError as exc:
        print(f"sds inspect: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        sys.stdout.write(render_sds(report))
    return 0
