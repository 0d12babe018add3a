"""What ``bench_delta`` reports beside sizes and times: the lossless bound and where a delta load spends its time.

* ``entropy_bound``: what a difference filter could reach at best on a pair of checkpoints. Per element,
  the difference ``d`` of the bit patterns costs the order-0 entropy of its bit length ``k`` (over the
  tensor) plus ``k - 1`` uniform bits and a sign; a tensor costs that, or its standalone size when smaller
  (a writer stores such a tensor alone). Tensors without a base of the same name, dtype and shape count
  at their standalone size.
* ``load_stages``: the residuals rebuilt from the base's high planes, chunk by chunk on one thread, each
  stage timed (residual planes decode, base high planes decode, interleaving, the filter's inverse, the
  checksum of the rebuilt bytes), against the standalone file's chunks (planes decode, join, checksum).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

import mettaformat
from mettaformat.container import chain, delta_planes
from mettaformat.container.codecs.planes import ENTROPY, FLOAT_TAGS, encode_plane, split_planes
from mettaformat.dtypes import itemsize, tag_from_dtype

_SIGNED = {2: np.int16, 4: np.int32, 8: np.int64}


def standalone_size(t: torch.Tensor) -> int:
    """Bytes of ``t`` as the zstd codec's planes code it (one frame per plane, the default coder)."""
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    width = t.element_size()
    if width == 1 or len(data) < 4096:
        return len(encode_plane(data, (ENTROPY,)))
    planes = split_planes(torch.from_numpy(data), width, tag_from_dtype(t.dtype) in FLOAT_TAGS)
    return sum(len(encode_plane(np.ascontiguousarray(planes[i]), (ENTROPY,))) for i in range(width))


def _difference_bits(t: torch.Tensor, b: torch.Tensor) -> float:
    width = t.element_size()
    tw = t.contiguous().reshape(-1).view(torch.uint8).numpy().view(_SIGNED[width])
    bw = b.contiguous().reshape(-1).view(torch.uint8).numpy().view(_SIGNED[width])
    d = np.subtract(tw, bw)  # wraps: the difference modulo 2^bits, as a signed integer
    magnitude = np.abs(d.astype(np.float64))
    k = np.where(magnitude > 0, np.frexp(magnitude)[1], 0)  # bit length
    counts = np.bincount(k)
    p = counts[counts > 0] / len(k)
    return float(len(k) * -(p * np.log2(p)).sum() + np.maximum(k - 1, 0).sum() + np.count_nonzero(k))


def entropy_bound(prev: dict[str, torch.Tensor], cur: dict[str, torch.Tensor]) -> tuple[int, float]:
    """(standalone bytes of ``cur``, bytes a difference filter could reach at best against ``prev``)."""
    alone = bound = 0.0
    for name, t in cur.items():
        size = standalone_size(t)
        alone += size
        b = prev.get(name)
        if b is None or b.dtype != t.dtype or b.shape != t.shape or t.element_size() == 1 or t.dtype == torch.bool:
            bound += size
            continue
        bound += min(size, _difference_bits(t, b) / 8)
    return int(alone), bound


def load_stages(delta_path: Path, full_path: Path, repeat: int = 3) -> dict[str, Any]:
    """Milliseconds per stage of rebuilding ``delta_path``'s residuals from the base's high planes, and of
    decoding the same tensors from the standalone ``full_path`` (min over ``repeat`` runs of all chunks)."""
    best: dict[str, float] = {}
    with mettaformat.open(delta_path) as c, mettaformat.open(full_path) as full:
        s = c.header.section("model")
        names = chain.delta_names(c, "model")
        plans = [p for e in s.tensors if e.name in names if (p := delta_planes.plane_plan(c, s, e, names[e.name]))]
        mine, theirs, alone = c._readers["model"], c.base._readers["model"], full._readers["model"]  # type: ignore[union-attr]
        for _ in range(repeat):
            spent: Counter[str] = Counter()
            patches = [(mine, "plane", "delta: residual planes decode"), (theirs, "plane", "delta: base high planes decode"),
                       (delta_planes, "rebuild_planes", "delta: rebuild from the planes (inverse, interleave)"),
                       (alone, "_decode_chunk", "alone: chunk decode (planes and join)")]
            saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
            for obj, attr, label in patches:
                setattr(obj, attr, _timed(getattr(obj, attr), spent, label))
            try:
                for plan in plans:
                    _one_tensor(c, full, s, plan, spent)
            finally:
                for obj, attr, fn in saved:
                    setattr(obj, attr, fn)
            for label, seconds in spent.items():
                best[label] = min(best.get(label, float("inf")), seconds * 1e3)
    covered = sum(p.entry.nbytes for p in plans)
    return {"stages_ms": best, "plane_path_bytes": covered, "bytes": sum(e.nbytes for e in s.tensors),
            "high": dict(Counter(p.how.high for p in plans))}


def _timed(fn: Callable[..., Any], spent: Counter[str], label: str) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - t0
    return run


def _one_tensor(c: Any, full: Any, s: Any, plan: Any, spent: Counter[str]) -> None:
    width = itemsize(plan.how.dtype)
    out = torch.empty(plan.entry.nbytes, dtype=torch.uint8)
    fe = full.header.section("model").index.get(plan.entry.name)
    again = torch.empty(fe.nbytes, dtype=torch.uint8)
    position = 0
    for i, ((_, _, n), (first, _)) in enumerate(zip(plan.chunks, full._readers["model"].tensor_chunks[fe.name],
                                                    strict=True)):
        piece, other = out[position : position + n * width], again[position : position + n * width]
        position += n * width
        delta_planes._rebuild_chunk(c, s, plan, i, piece)
        t0 = time.perf_counter()
        xxhash.xxh3_64_intdigest(piece.numpy())
        spent["delta: checksum of the rebuilt bytes"] += time.perf_counter() - t0
        full._readers["model"]._decode_chunk(full._mapped(), first, width, other, width)
        t0 = time.perf_counter()
        xxhash.xxh3_64_intdigest(other.numpy())
        spent["alone: checksum"] += time.perf_counter() - t0
    assert torch.equal(out, again), f"{plan.entry.name}: the rebuilt tensor differs from the standalone file's"
