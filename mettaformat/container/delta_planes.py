"""Rebuilding residuals from the base's high byte planes only.

A residual of the ``zigzag-sub-high`` filter needs only the top ``high`` bytes of each base element,
and a ``zstd`` base keeps each byte plane in a frame of its own. When the residual and the base
tensor are both stored as plane groups cut at the same elements (what this writer does with one
frame size), each chunk is rebuilt on its own: its residual frames decode, only the base frames of
the high planes decode (the near-random low mantissa planes of the base are never read), and the
tensor's elements are built from those planes (:func:`rebuild_planes`), then hashed with the chunks
before it. The base tensor is never decoded whole. Any other layout (a raw base, a base that is
itself a delta, other chunking) takes the general path of ``chain.py``, which reads the base tensor
whole.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch

from mettaformat._pool import pool_for
from mettaformat._torch import tensor_bytes
from mettaformat.container.codecs.planes import FLOAT_TAGS, join_planes, scratch, split_planes
from mettaformat.container.codecs.zstd import FILTER_FLOAT_PLANES, FILTER_PLANES, ZstdSection
from mettaformat.container.delta import DeltaTensor
from mettaformat.container.delta_filter import apply_residual_in_place
from mettaformat.container.verify import OrderedHasher
from mettaformat.dtypes import dtype_from_tag, itemsize

if TYPE_CHECKING:
    from mettaformat.container.codecs.base import SectionReader
    from mettaformat.container.header import SectionEntry, TensorEntry
    from mettaformat.container.reader import LazyCheckpoint

__all__ = ["PlanePlan", "as_tensor", "plane_plan", "rebuild_planes", "start_rebuild"]

_PLANE_FILTERS: Final = (FILTER_FLOAT_PLANES, FILTER_PLANES)
#: scratch slots of ``planes.scratch`` (0-3 are the split's and the join's)
_RESIDUAL_ROWS, _BASE_ROWS, _HIGH_WORDS, _BASE_WORDS = 10, 11, 12, 13
_zeros_lock = threading.Lock()
_zeros = np.zeros(0, dtype=np.uint8)


def _zero_plane(n: int) -> np.ndarray:
    """``n`` zero bytes, shared read-only: the low planes the high-plane join leaves empty."""
    global _zeros
    with _zeros_lock:
        if len(_zeros) < n:
            _zeros = np.zeros(n, dtype=np.uint8)
            _zeros.flags.writeable = False
        return _zeros[:n]


@dataclass(frozen=True)
class PlanePlan:
    """How one residual is rebuilt chunk by chunk: per chunk, (first residual frame, first base frame,
    elements), in order."""

    entry: TensorEntry
    base_entry: TensorEntry
    how: DeltaTensor
    chunks: list[tuple[int, int, int]]


def _plane_groups(reader: SectionReader, name: str, width: int) -> list[tuple[int, int]] | None:
    """(first frame, elements) of each chunk of tensor ``name`` when every chunk is a plane group, else None."""
    if not isinstance(reader, ZstdSection) or (chunks := reader.tensor_chunks.get(name)) is None:
        return None
    out = []
    for first, count in chunks:
        _, _, rlen, flt = reader.frames[first]
        if flt not in _PLANE_FILTERS or count != width:
            return None
        out.append((first, rlen))
    return out


def plane_plan(ckpt: LazyCheckpoint, s: SectionEntry, entry: TensorEntry, how: DeltaTensor) -> PlanePlan | None:
    """The chunk-by-chunk plan for the residual ``entry`` of ``ckpt``, or None when the layouts do not allow it
    (the caller then reads the base tensor whole)."""
    from mettaformat.container.chain import delta_names

    base = ckpt.base
    width = itemsize(how.dtype)
    if base is None or width == 1 or not (ckpt._src.mappable and base._src.mappable):
        return None
    bs = base.header.section(s.name)
    be = bs.index.get(entry.name) if bs is not None else None
    if bs is None or be is None or be.dtype != how.dtype or be.shape != entry.shape:
        return None  # the general path names the mismatch
    if be.name in delta_names(base, bs.name):
        return None
    mine = _plane_groups(ckpt._readers[s.name], entry.name, width)
    theirs = _plane_groups(base._readers[bs.name], be.name, width)
    if mine is None or theirs is None or [n for _, n in mine] != [n for _, n in theirs]:
        return None
    return PlanePlan(entry, be, how, [(a, b, n) for (a, n), (b, _) in zip(mine, theirs, strict=True)])


def _rebuild_chunk(ckpt: LazyCheckpoint, s: SectionEntry, plan: PlanePlan, chunk: int, out: torch.Tensor) -> None:
    """Rebuild chunk ``chunk`` of the tensor of ``plan`` into ``out`` (its bytes) from the residual's planes and
    the base's high planes (:func:`rebuild_planes`)."""
    from mettaformat.container.chain import reading_base

    assert ckpt.base is not None
    base = ckpt.base
    first, base_first, n = plan.chunks[chunk]
    width, high = itemsize(plan.how.dtype), plan.how.high
    float_bits = plan.how.dtype in FLOAT_TAGS
    top = max(high, 2) if float_bits else high  # base planes read: the float-planes filter moves the sign down
    mine = ckpt._readers[s.name]
    reader = base._readers[s.name]  # the base tensor lies in the section of the same name
    assert isinstance(mine, ZstdSection) and isinstance(reader, ZstdSection)  # plane_plan checked both
    rows = scratch(width * n, _RESIDUAL_ROWS).reshape(width, n)
    # The whole tensor is rebuilt and, when verifying, checked against its checksum, which covers the
    # stored planes' bytes too: their own content checksums are skipped as in a standalone load.
    residual = [mine.plane(ckpt._mapped(), first + k, rows[k], content_checksum=False) for k in range(width)]
    base_rows = scratch(top * n, _BASE_ROWS).reshape(top, n)
    with reading_base(base, f"tensor {plan.base_entry.name!r}"):
        source = base._mapped()
        base_planes = [reader.plane(source, base_first + k, base_rows[k - width + top], content_checksum=False)
                       for k in range(width - top, width)]
    rebuild_planes(residual, base_planes, out, high, float_bits)


def rebuild_planes(residual: list[list[np.ndarray]], base_planes: list[list[np.ndarray]], out: torch.Tensor,
                   high: int, float_bits: bool) -> None:
    """``out`` (the chunk's bytes) from the residual's planes and the base's top planes (``max(high, 2)``
    of them for floats, whose sign the float-planes filter moves down, else ``high``), each as pieces.

    The high bytes are rebuilt as words of the smallest width ``v`` (1, 2, 4 or 8 bytes) that holds the
    base's planes: the residual's high planes and the base's are each interleaved over zero planes into
    ``v``-byte words, turned into the tensor's high bytes by the filter's inverse, split back into planes
    and interleaved with the residual's low planes (which are the tensor's own bytes). With ``v`` the
    element width the words are the result.
    """
    width = len(residual)
    n = out.numel() // width
    top = len(base_planes)
    words = next(v for v in (1, 2, 4, 8) if v >= top)
    zero = [_zero_plane(n)]
    z = out if words == width else torch.from_numpy(scratch(words * n, _HIGH_WORDS))
    b = torch.from_numpy(scratch(words * n, _BASE_WORDS))
    # words as wide as the element hold the residual's own low bytes too; narrower ones zero below the high bytes
    _interleave(residual if words == width else [zero] * (words - high) + residual[width - high :], z, words, False)
    _interleave([zero] * (words - top) + base_planes, b, words, float_bits)
    apply_residual_in_place(z, b.numpy(), words, high)
    if words == width:
        return
    rebuilt = z.numpy() if words == 1 else split_planes(z, words, False)
    high_planes = [[rebuilt]] if words == 1 else [[rebuilt[k]] for k in range(words - high, words)]
    join_planes(residual[: width - high] + high_planes, out, width, False)


def _interleave(planes: list[list[np.ndarray]], out: torch.Tensor, width: int, float_bits: bool) -> None:
    """``planes`` (pieces of each) as ``width``-byte words in ``out``; one plane is copied."""
    if width > 1:
        join_planes(planes, out, width, float_bits)
    else:
        np.concatenate(planes[0], out=out.numpy())


def start_rebuild(ckpt: LazyCheckpoint, s: SectionEntry, plans: list[PlanePlan]
                  ) -> list[tuple[PlanePlan, torch.Tensor, list[Future[None]], Any]]:
    """Submit every chunk of ``plans`` to the shared pool: per tensor, (plan, its bytes, the chunk jobs,
    what gives the digest of the rebuilt bytes once they ran, or None when not verifying)."""
    from mettaformat.container.chain import needs_rebuild_check

    pool = pool_for(sum(plan.entry.nbytes for plan in plans))
    started = []
    for plan in plans:
        width = itemsize(plan.how.dtype)
        out = torch.empty(plan.entry.nbytes, dtype=torch.uint8)
        jobs, position = [], 0
        for i, (_, _, n) in enumerate(plan.chunks):
            jobs.append(_bind(ckpt, s, plan, i, out[position : position + n * width]))
            position += n * width
        hasher = OrderedHasher(tensor_bytes(out), [n * width for _, _, n in plan.chunks]) \
            if needs_rebuild_check(ckpt, s, plan.entry) else None
        if hasher is not None:
            jobs = hasher.wrap(jobs)
        started.append((plan, out, [pool.submit(job) for job in jobs], hasher))
    return started


def _bind(ckpt: LazyCheckpoint, s: SectionEntry, plan: PlanePlan, chunk: int, out: torch.Tensor) -> Any:
    return lambda: _rebuild_chunk(ckpt, s, plan, chunk, out)


def as_tensor(plan: PlanePlan, out: torch.Tensor) -> torch.Tensor:
    """The rebuilt bytes as the tensor of ``plan``."""
    return out.view(dtype_from_tag(plan.how.dtype)).reshape(plan.entry.shape)
