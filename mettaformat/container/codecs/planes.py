"""Byte planes and how each one is coded.

A float's bytes carry very different information: the top byte of fp32/bf16 (sign and most of
the exponent) takes a few distinct values, the low mantissa bytes of trained weights are nearly
random. Elements are split into byte planes, and in the top two planes the sign bit trades places
with the exponent's lowest bit, so the top plane is exactly the exponent (fp32, bf16; the top 8
exponent bits of f64, f16's 5 with 3 mantissa bits). Each plane is its own zstd frame, coded as it
deserves:

* a plane whose byte histogram says it cannot shrink by 0.5% is stored (a frame of raw blocks: a
  copy and a hash, no compression attempt);
* otherwise the level's coders are tried cheapest first and the smallest output kept (a slower
  coder must win by 0.5%). The ``entropy`` coder is zstd tuned to find almost no matches (fast
  strategy, minimum match 7, a 1 KiB hash table), which leaves Huffman coding of the literals:
  the exponent plane reaches within 2% of its order-0 entropy at several hundred MB/s.

``benchmarks/bench_codecs.py`` measured the choices (ratio and speed per plane and level).
"""

from __future__ import annotations

import threading
from typing import Final, Literal

import numpy as np
import torch
import zstandard

from mettaformat.container.codecs.zstd_frames import compressor, stored_frame
from mettaformat.errors import WriteError

__all__ = ["FLOAT_TAGS", "Level", "coders_for", "encode_plane", "join_planes", "scratch", "split_planes"]

Level = Literal["fast", "max"]
#: Float dtypes whose sign bit leaves the top plane (the ``float-planes`` filter).
FLOAT_TAGS: Final = frozenset({"F16", "BF16", "F32", "F64"})

#: Compressor keys (see ``zstd_frames.compressor``): Huffman-coded literals, almost no matches.
ENTROPY: Final = (zstandard.STRATEGY_FAST, 17, 10, 10, 1, 7, 0)
#: Optimal parsing tuned for byte planes: matches of 7+ bytes and literal costs modelled exactly.
OPTIMAL: Final = (zstandard.STRATEGY_BTULTRA2, 17, 14, 14, 3, 7, 16)
#: Planes below this many bytes skip the histogram estimate (it would cost more than it saves).
_ESTIMATE_MIN: Final = 4096
#: Larger scratch requests (frames bigger than the default) get a fresh array that is not kept.
_SCRATCH_KEEP: Final = 16 << 20
_STORE_BELOW_GAIN: Final = 1.005


def coders_for(level: int | str) -> tuple[tuple[int, ...], ...]:
    """The coders a level tries on each plane that may compress, cheapest first.

    ``"fast"`` (the default): entropy coding only. An integer ``L`` from 2 to 22: entropy coding
    and zstd level ``L`` (which finds repeats the entropy coder does not). ``"max"``: entropy
    coding and optimal parsing (archival; an order of magnitude slower to write). ``1`` is
    ``"fast"``; negative levels (-7..-1) try only zstd's fast negative level.
    """
    if isinstance(level, bool):
        pass
    elif level == "fast" or level == 1:
        return (ENTROPY,)
    elif level == "max":
        return (ENTROPY, OPTIMAL)
    elif isinstance(level, int):
        if -7 <= level <= -1:
            return ((level,),)
        if 2 <= level <= 22:
            return (ENTROPY, (level,))
    raise WriteError(f"zstd level {level!r} is not 'fast', 'max' or an integer in -7..22 other than 0")


_local = threading.local()


def scratch(nbytes: int, slot: int = 0) -> np.ndarray:
    """This thread's reusable buffer ``slot`` of at least ``nbytes``: fresh multi-MiB arrays per chunk
    cost page faults that showed up as a third of the plane split and join time."""
    if nbytes > _SCRATCH_KEEP:
        return np.empty(nbytes, dtype=np.uint8)
    buffers: dict[int, np.ndarray] | None = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buf = buffers.get(slot)
    if buf is None or len(buf) < nbytes:
        buf = buffers[slot] = np.empty(max(nbytes, 1 << 16), dtype=np.uint8)
    return buf[:nbytes]


def split_planes(chunk: torch.Tensor, width: int, float_bits: bool) -> np.ndarray:
    """``(width, n)`` byte planes of ``chunk`` (uint8, ``n * width`` bytes); with ``float_bits`` the sign
    moves out of the top plane so that it holds exactly the exponent's top 8 bits.

    The result is this thread's scratch buffer: use it before splitting the next chunk.
    """
    data = chunk.numpy()
    elements = data.reshape(-1, width)
    planes = scratch(len(data)).reshape(width, -1)
    for i in range(width):
        planes[i] = elements[:, i]
    if float_bits:
        _swap_sign(planes[width - 1], planes[width - 2])
    return planes


def join_planes(planes: np.ndarray, out: torch.Tensor, width: int, float_bits: bool) -> None:
    """Inverse of :func:`split_planes`: interleave ``planes`` (``width * n`` bytes, modified) into ``out``."""
    source = planes.reshape(width, -1)
    if float_bits:
        _unswap_sign(source[width - 1], source[width - 2])
    elements = out.numpy().reshape(-1, width)
    for i in range(width):
        elements[:, i] = source[i]


def _swap_sign(hi: np.ndarray, lo: np.ndarray) -> None:
    """In place: ``hi, lo = (hi << 1) | (lo >> 7), (lo & 0x7F) | (hi & 0x80)`` (two planes, not whole
    elements: a third of the work of rotating every element by one bit)."""
    sign = scratch(len(hi), 1)
    carry = scratch(len(hi), 2)
    np.bitwise_and(hi, 0x80, out=sign)
    np.right_shift(lo, 7, out=carry)
    np.left_shift(hi, 1, out=hi)
    np.bitwise_or(hi, carry, out=hi)
    np.bitwise_and(lo, 0x7F, out=lo)
    np.bitwise_or(lo, sign, out=lo)


def _unswap_sign(hi: np.ndarray, lo: np.ndarray) -> None:
    """Inverse of :func:`_swap_sign`: ``hi, lo = (lo & 0x80) | (hi >> 1), (lo & 0x7F) | (hi << 7)``."""
    sign = scratch(len(hi), 1)
    carry = scratch(len(hi), 2)
    np.bitwise_and(lo, 0x80, out=sign)
    np.left_shift(hi, 7, out=carry)
    np.right_shift(hi, 1, out=hi)
    np.bitwise_or(hi, sign, out=hi)
    np.bitwise_and(lo, 0x7F, out=lo)
    np.bitwise_or(lo, carry, out=lo)


def _may_compress(plane: np.ndarray) -> bool:
    """Whether the order-0 entropy of a sample (every 8th byte) promises a 0.5% gain."""
    if len(plane) < _ESTIMATE_MIN:
        return True
    counts = np.bincount(plane[::8], minlength=256)
    p = counts[counts > 0] / counts.sum()
    bits = float(-(p * np.log2(p)).sum())
    return bits < 8 / _STORE_BELOW_GAIN


def encode_plane(plane: np.ndarray, coders: tuple[tuple[int, ...], ...]) -> bytes:
    """One zstd frame holding ``plane`` (contiguous uint8, non-empty), coded as ``coders`` measure best."""
    if not _may_compress(plane):
        return stored_frame(plane.data)
    best: bytes | None = None
    for key in coders:
        blob = compressor(key).compress(plane.data)
        if best is None or len(blob) < len(best) / _STORE_BELOW_GAIN:
            best = blob
    assert best is not None
    if len(best) * _STORE_BELOW_GAIN > len(plane):
        return stored_frame(plane.data)  # decodes as a plain copy
    return best
