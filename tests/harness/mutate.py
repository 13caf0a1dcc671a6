"""Seeded mutation of config files, for fuzzing the real parsers (reproducible by seed)."""

from __future__ import annotations

import random
from collections.abc import Iterator

# Tokens that broke parsers before: dates, huge or odd numbers, tags, nesting, control bytes.
TOKENS = [
    b"2024-02-30",
    b"2024-01-01 10:00:00",
    b"9" * 5000,
    b"0x" + b"f" * 40,
    b".inf",
    b"-.nan",
    b"1e999",
    b"!!timestamp 2024-02-30",
    b"!!float abc",
    b"!!binary ===",
    b"!!python/object:os.system",
    b"[" * 200,
    b"{" * 200,
    b"- " * 100,
    b"&a [*a]",
    b"*undefined",
    b"\x00",
    b"\xff\xfe",
    b"\xc3",
    b"\t",
    b"\r",
    b"~",
    b"null",
    b"true",
    b"5",
    b"-1",
    b"'0o777'",
    b'"\\0"',
    b"? [a, b]\n: c",
    b"<<: *a",
    b"%YAML 9.9\n---",
    b"---\n",
    b"...\n",
    b"spiffe://",
    b"spiffe://a/b/*",
    b"unix://",
    b"tcp://[::1]:99999",
    b"trust_domains: 5",
    b"allow: {}",
    b"allowed_uids: [4294967296]",
]

SEED_CONFIG = b"""workload_api: unix:///run/spire/agent.sock
listen: unix:///run/sds/sds.sock
socket_mode: '0660'
allowed_uids: [101]
allowed_gids: [0]
names: {default_svid: default, own_bundle: ROOTCA}
default_svid: {hint: external}
trust_domain: example.org
secrets:
  - {name: internal, hint: internal}
policies:
  - name: callers
    trust_domains: [example.org, partner.test]
    allow: [spiffe://example.org/a, spiffe://example.org/ns/*]
admin: 127.0.0.1:0
"""


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits: flip, delete, duplicate, insert a token, truncate."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(out) + 1)
        action = rng.randrange(6)
        if action == 0 and out:
            out[min(where, len(out) - 1)] = rng.randrange(256)
        elif action == 1:
            del out[where : where + rng.randint(1, 20)]
        elif action == 2:
            end = min(len(out), where + rng.randint(1, 60))
            out[where:where] = out[where:end]
        elif action in (3, 4):
            out[where:where] = rng.choice(TOKENS)
        else:
            del out[where:]
    return bytes(out)


def mutations(count: int, seed: int, base: bytes = SEED_CONFIG) -> Iterator[bytes]:
    """``count`` mutated configs, the same for the same ``seed``."""
    rng = random.Random(seed)
    for _ in range(count):
        yield mutate(base, rng)
