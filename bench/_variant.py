"""Benchmark helper: ``sds ARGS`` with an experimental tweak applied, to measure a proposal.

``python bench/_variant.py VARIANT ARGS...``

* ``gc-freeze``: import every module ``sds run`` loads, then ``gc.collect()``
  and ``gc.freeze()`` before running, so the long-lived objects created by
  imports are never scanned again by the cyclic garbage collector (what a
  one-line change at the end of ``sds run``'s start-up would do).

Earlier what-ifs (``fast-decode``, ``release-request``) measured changes that
have since shipped (commits ``b8c1171`` and ``18387e2``); their results stay in
BENCHMARKS.md. Not the shipped code: results are labelled "what-if".
"""

from __future__ import annotations

import gc
import sys

VARIANTS = ("gc-freeze",)


def run() -> int:
    """Apply ``sys.argv[1]`` and run ``sds`` with the remaining arguments."""
    variant = sys.argv[1] if len(sys.argv) > 1 else ""
    if variant not in VARIANTS:
        print(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    import grpclib.server  # noqa: F401
    import prometheus_client  # noqa: F401

    from sds.cli import main

    gc.collect()
    gc.freeze()
    return main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(run())
