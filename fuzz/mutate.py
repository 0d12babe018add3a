"""A small mutation fuzzer for machines without atheris (not coverage-guided)."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence

_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 63, (1 << 64) - 1]


def mutate(data: bytes, rng: random.Random, corpus: Sequence[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if not buf or op == 0:
            buf[rng.randrange(len(buf) + 1):] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 1:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 2:
            i = rng.randrange(len(buf))
            del buf[i:i + rng.randint(1, 16)]
        elif op == 3 and len(buf) >= 8:
            i = rng.randrange(len(buf) - 7)
            buf[i:i + 8] = struct.pack("<Q", rng.choice(_INTERESTING) & ((1 << 64) - 1))
        elif op == 4 and corpus:
            other = rng.choice(corpus)
            i, j = rng.randrange(len(buf) + 1), rng.randrange(len(other) + 1)
            buf = buf[:i] + other[j:j + rng.randint(1, 256)]
        else:
            i = rng.randrange(len(buf))
            buf[i:i] = buf[i:i + rng.randint(1, 32)]
    return bytes(buf)


def fuzz_loop(target: Callable[[bytes], None], corpus: Sequence[bytes], deadline: float, seed: int,
              clock: Callable[[], float]) -> int:
    """Run ``target`` on mutations of ``corpus`` until ``deadline``; return the number of runs.

    Exceptions from ``target`` propagate (they are findings), with the input attached.
    """
    rng = random.Random(seed)
    runs = 0
    while clock() < deadline:
        data = mutate(rng.choice(corpus) if corpus else b"", rng, corpus)
        try:
            target(data)
        except Exception as e:
            e.add_note(f"fuzz input ({len(data)} bytes): {data[:64]!r}...")
            e.fuzz_input = data  # type: ignore[attr-defined]
            raise
        runs += 1
    return runs
