"""Seeded mutation of gRPC messages and their framing, for fuzzing servers (by seed)."""

from __future__ import annotations

import random

from tests.harness.h2async import grpc_frame


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to three random edits of ``data``."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:  # flip a bit
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncate
            del out[pos:]
        elif op == 2:  # insert random bytes
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:  # delete a run
            del out[pos : pos + rng.randint(1, 16)]
        elif op == 4:  # an endless or huge varint
            out[pos:pos] = b"\xff" * rng.randint(1, 12)
        elif op == 5 and out:  # a random byte, often a tag with a rare wire type
            out[rng.randrange(len(out))] = rng.randrange(256)
        else:  # duplicate a slice (repeated fields, nested lengths that no longer match)
            j = rng.randrange(len(out) + 1)
            out[pos:pos] = out[min(pos, j) : max(pos, j)][:64]
    return bytes(out)


def frame(rng: random.Random, message: bytes) -> bytes:
    """The gRPC framing around ``message``, usually right, sometimes wrong."""
    roll = rng.random()
    if roll < 0.80:
        return grpc_frame(message)
    if roll < 0.85:
        return grpc_frame(message, flag=rng.choice([1, 2, 0x80, 0xFF]))
    if roll < 0.92:
        return grpc_frame(message, length=max(0, len(message) + rng.randint(-8, 64)))
    if roll < 0.96:
        return grpc_frame(message)[: rng.randrange(5)]  # a cut prefix
    return grpc_frame(message) + grpc_frame(mutate(rng, message))  # two messages
