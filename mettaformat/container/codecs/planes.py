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
  strategy, minimum match 7, zstd's smallest hash table of 64 entries), which leaves Huffman coding
  of the literals: the few short repeats the fast matcher finds in an exponent plane cost more
  than the literals they replace (MiniLM's exponent plane: 2.97x with 1024 entries, 3.03x with 64,
  within 2% of its order-0 entropy, and faster to write and read). The window stays at 128 KiB:
  a smaller one shrinks zstd's blocks, and each block carries its own Huffman table.

Splitting and joining planes is one pass in C (``_planes.c``, 2-3x numpy's eight passes on one
core, where the join was two thirds of decode time); where the extension is not built the numpy
functions below apply the same rule, and the tests hold both to a byte-by-byte reference.

``benchmarks/bench_codecs.py`` measured the choices (ratio and speed per plane and level).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Final, Literal

import numpy as np
import torch
import zstandard

from mettaformat.container.codecs.zstd_frames import compressor, stored_frame
from mettaformat.errors import WriteError

_kernel: ModuleType | None
try:  # the compiled split and join (_planes.c, built by setup.py); numpy does the same where it is absent
    from mettaformat.container.codecs import _planes as _kernel
except ImportError:  # pragma: no cover - a build without a C compiler
    _kernel = None

__all__ = ["FLOAT_TAGS", "Level", "coders_for", "encode_plane", "join_planes", "scratch", "split_planes"]

Level = Literal["fast", "max"]
#: Float dtypes whose sign bit leaves the top plane (the ``float-planes`` filter).
FLOAT_TAGS: Final = frozenset({"F16", "BF16", "F32", "F64"})

#: Compressor keys (see ``zstd_frames.compressor``): Huffman-coded literals, almost no matches.
ENTROPY: Final = (zstandard.STRATEGY_FAST, 17, 6, 6, 1, 7, 0)
#: Optimal parsing tuned for byte planes: matches of 7+ bytes and literal costs modelled exactly.
OPTIMAL: Final = (zstandard.STRATEGY_BTULTRA2, 17, 14, 14, 3, 7, 16)
#: Planes below this many bytes skip the histogram estimate (it would cost more than it saves).
_ESTIMATE_MIN: Final = 4096
#: Every how many bytes the estimate samples: numpy's histogram widens each sampled byte to 64 bits,
#: and every 8th cost 14 ms of a 64 MiB save's CPU; 32K samples per 1 MiB plane still estimate the
#: entropy to within 0.006 bits, against a decision threshold 0.04 bits below random.
_SAMPLE_STEP: Final = 32
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


#: Elements per pass of the numpy split and join: the pieces of one block (128 KiB per plane at most) stay
#: in the core's cache between the passes that build or take apart its words, and a stored frame's
#: raw blocks (128 KiB each) are joined without being cut.
_BLOCK: Final = 1 << 17
_WORD: Final = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def split_planes(chunk: torch.Tensor, width: int, float_bits: bool) -> np.ndarray:
    """``(width, n)`` byte planes of ``chunk`` (uint8, ``n * width`` bytes); with ``float_bits`` the sign
    moves out of the top plane so that it holds exactly the exponent's top 8 bits.

    The result is this thread's scratch buffer: use it before splitting the next chunk.
    """
    data = chunk.numpy()
    planes = scratch(len(data)).reshape(width, len(data) // width)
    if _kernel is None:
        _split_numpy(data, planes, width, float_bits)
    else:
        _kernel.split(data, tuple(planes), float_bits)
    return planes


def _split_numpy(data: np.ndarray, planes: np.ndarray, width: int, float_bits: bool) -> None:
    """:func:`split_planes` where the kernel is not built. Whole words are shifted apart block by
    block (contiguous passes numpy vectorises; byte-strided copies ran at a third of the speed)."""
    words = data.view(_WORD[width])
    n = len(words)
    plain = width - 2 if float_bits else width
    for start in range(0, n, _BLOCK):
        block = words[start : start + _BLOCK]
        m = len(block)
        for i in range(plain):
            np.right_shift(block, 8 * i, out=planes[i, start : start + m], casting="unsafe")
        if float_bits:
            pair, spare = scratch(2 * m, 1).view(np.uint16), scratch(2 * m, 2).view(np.uint16)
            np.right_shift(block, 8 * plain, out=pair, casting="unsafe")
            _split_float_pair(pair, planes[plain, start : start + m], planes[plain + 1, start : start + m], spare)


def join_planes(planes: Sequence[Sequence[np.ndarray]], out: torch.Tensor, width: int, float_bits: bool) -> None:
    """Inverse of :func:`split_planes`: interleave ``planes`` into ``out`` (``width * n`` bytes).

    Each plane comes as contiguous uint8 pieces that add up to ``n`` bytes (a decoded frame is one
    piece; a stored frame's raw blocks are read where they lie in the file, without a copy); the
    kernel joins each span that lies inside one piece of every plane.
    """
    words = out.numpy()
    n = len(words) // width
    if _kernel is None:
        _join_numpy([_Pieces(pieces, n) for pieces in planes], words.view(_WORD[width]), width, float_bits)
        return
    for start, end, views in _common_spans(planes, n):
        _kernel.join(words[start * width : end * width], views, float_bits)


def _common_spans(planes: Sequence[Sequence[np.ndarray]], n: int) -> Iterator[tuple[int, int, list[np.ndarray]]]:
    """``(start, end, one view per plane)`` covering elements ``0..n``, cut wherever a piece of any plane
    ends, so that every view is contiguous."""
    cursors = [_Pieces(pieces, n) for pieces in planes]
    start = 0
    while start < n:
        end = min(c.piece_end(start) for c in cursors)
        yield start, end, [c.take(start, end) for c in cursors]
        start = end


def _join_numpy(cursors: list[_Pieces], words: np.ndarray, width: int, float_bits: bool) -> None:
    """:func:`join_planes` where the kernel is not built. Each pair of planes becomes 16-bit halves
    and the halves are shifted into whole words, block by block: every pass is contiguous, where
    byte-strided stores ran at half the speed."""
    n = len(words)
    pairs = width // 2
    start = 0
    while start < n:
        end = min(start + _BLOCK, *(c.piece_end(start) for c in cursors))
        block = words[start:end]
        m = end - start
        pair = block if width == 2 else scratch(2 * m, 1).view(np.uint16)
        spare = scratch(2 * m, 2).view(np.uint16)
        for k in reversed(range(pairs)):
            lo, hi = cursors[2 * k].take(start, end), cursors[2 * k + 1].take(start, end)
            if float_bits and k == pairs - 1:
                _join_float_pair(lo, hi, pair, spare)
            else:
                np.left_shift(hi, 8, out=pair, dtype=np.uint16)
                np.bitwise_or(pair, lo, out=pair, casting="unsafe")
            if width == 2:
                continue
            if k == pairs - 1:
                np.left_shift(pair, 16 * k, out=block, dtype=block.dtype)
            elif k:
                shifted = scratch(width * m, 3).view(block.dtype)
                np.left_shift(pair, 16 * k, out=shifted, dtype=block.dtype)
                np.bitwise_or(block, shifted, out=block)
            else:
                np.bitwise_or(block, pair, out=block, casting="unsafe")
        start = end


class _Pieces:
    """A plane given as consecutive pieces, read front to back in spans that stay inside one piece."""

    def __init__(self, pieces: Sequence[np.ndarray], n: int) -> None:
        self.pieces = [p for p in pieces if len(p)]
        if sum(len(p) for p in self.pieces) != n:
            raise ValueError(f"plane pieces hold {sum(len(p) for p in self.pieces)} bytes, not {n}")
        self.index = 0
        self.base = 0  # plane offset of pieces[index]

    def piece_end(self, start: int) -> int:
        """Plane offset where the piece holding ``start`` ends (moving past the pieces before it)."""
        while self.base + len(self.pieces[self.index]) <= start:
            self.base += len(self.pieces[self.index])
            self.index += 1
        return self.base + len(self.pieces[self.index])

    def take(self, start: int, end: int) -> np.ndarray:
        return self.pieces[self.index][start - self.base : end - self.base]


def _split_float_pair(pair: np.ndarray, lo: np.ndarray, hi: np.ndarray, spare: np.ndarray) -> None:
    """The top 16 bits of floats (``pair``, overwritten) as two planes: ``hi`` the 8 exponent bits,
    ``lo`` the sign above the 7 mantissa bits (the sign trades places with the exponent's lowest bit)."""
    np.right_shift(pair, 7, out=hi, casting="unsafe")
    np.bitwise_and(pair, 0x807F, out=spare)
    np.right_shift(spare, 8, out=pair)
    np.bitwise_or(spare, pair, out=lo, casting="unsafe")


def _join_float_pair(lo: np.ndarray, hi: np.ndarray, pair: np.ndarray, spare: np.ndarray) -> None:
    """Inverse of :func:`_split_float_pair` into ``pair`` (uint16): ``hi << 7 | (lo * 0x101 & 0x807F)``
    (the multiply puts ``lo``'s sign at bit 15 and keeps its mantissa at bits 0..6)."""
    np.multiply(lo, 0x101, out=spare, dtype=np.uint16)
    np.bitwise_and(spare, 0x807F, out=spare)
    np.left_shift(hi, 7, out=pair, dtype=np.uint16)
    np.bitwise_or(pair, spare, out=pair)


def _may_compress(plane: np.ndarray) -> bool:
    """Whether the order-0 entropy of a sample (every 32nd byte) promises a 0.5% gain."""
    if len(plane) < _ESTIMATE_MIN:
        return True
    counts = np.bincount(plane[::_SAMPLE_STEP], minlength=256)
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
