"""The provider's parsers against bad and hostile input: one-line ConfigError, never a crash.

The tests here start real processes (the bridge, the provider, peers), no Envoy; the others are in
``tests/unit/test_provider_parsers.py``.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from grpclib.client import Channel

from sds._proto import workload_pb2 as pb
from sds._proto.workload_grpc import SpiffeWorkloadAPIStub
from tests.conftest import Processes, wait_for
from tests.harness.identity_cases import IDENTITY_CASES
from tests.harness.provider import provider_args, start_provider, write_identities
from tests.harness.workload_client import first

pytestmark = pytest.mark.hostile


def test_cli_ttl_overflow_exits_2_with_one_line(
    procs: Processes, sockdir: Path, tmp_path: Path
) -> None:
    ids = write_identities(tmp_path)
    args = provider_args(sockdir / "w.sock", ids, "--ephemeral", "--x509-ttl", "99999999999h")
    proc = procs.sds(*args)
    assert proc.wait(30) == 2
    assert procs.log(proc) == (
        "sds workload-api: --x509-ttl: duration '99999999999h' is longer than 87600h\n"
    )


RELOAD_SAMPLES: dict[str, tuple[bytes, str]] = {
    name: IDENTITY_CASES[name]
    for name in (
        "non-UTF-8",
        "impossible date",
        "5,000-digit integer",
        "deep nesting",
        "wrong type",
    )
}


async def test_sighup_with_bad_files_keeps_old_state_and_logs_each_failure(
    procs: Processes, sockdir: Path, tmp_path: Path
) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, ids, "--ephemeral")
    expected = []
    for content, message in RELOAD_SAMPLES.values():
        ids.write_bytes(content)
        os.kill(proc.pid, signal.SIGHUP)
        expected.append(message.format(f=ids))
        wait_for(
            lambda: procs.log(proc).count("provider.reload_failed") == len(expected),
            what="reload failure logged",
        )
    ids.unlink()
    os.mkfifo(ids)
    os.kill(proc.pid, signal.SIGHUP)
    expected.append(f"{ids}: not a regular file")
    wait_for(
        lambda: procs.log(proc).count("provider.reload_failed") == len(expected),
        what="FIFO reload failure logged",
    )
    log = procs.log(proc)
    failures = [line for line in log.splitlines() if "provider.reload_failed" in line]
    assert [line.split(' error="', 1)[1].rstrip('"') for line in failures] == expected
    assert "Traceback" not in log
    channel = Channel(path=str(sock))
    try:
        response = await asyncio.wait_for(
            first(SpiffeWorkloadAPIStub(channel).FetchX509SVID, pb.X509SVIDRequest()), 10
        )
    finally:
        channel.close()
    assert [s.spiffe_id for s in response.svids] == ["spiffe://example.org/svc/web"]
    assert proc.poll() is None
