"""Compare two checkpoints of any format: tensors added, removed or changed, and metadata differences."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mettaformat.anyformat import load_any

__all__ = ["CheckpointDiff", "TensorChange", "diff_checkpoints"]


@dataclass(frozen=True)
class TensorChange:
    name: str
    #: "values", "dtype" or "shape"
    kind: str
    detail: str
    max_abs_diff: float | None = None


@dataclass
class CheckpointDiff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[TensorChange] = field(default_factory=list)
    unchanged: int = 0
    metadata: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.changed or self.metadata)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["metadata"] = {k: {"a": a, "b": b} for k, (a, b) in self.metadata.items()}
        out["identical"] = self.identical
        return out


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        both = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        return both and _compare_tensor("", a, b, 0.0, 0.0) is None
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


#: Elements compared at a time: memory stays bounded whatever a tensor claims to hold.
_BLOCK = 1 << 20


def _blocks(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """Views of ``t`` of at most ``_BLOCK`` elements, in order (never a copy of the whole)."""
    if t.numel() <= _BLOCK or t.dim() == 0:
        yield t
        return
    row = t.numel() // t.size(0)
    if row > _BLOCK:
        for i in range(t.size(0)):
            yield from _blocks(t[i])
    else:
        step = _BLOCK // row
        for start in range(0, t.size(0), step):
            yield t[start : start + step]


def _collapse_broadcast(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Drop the dimensions both tensors repeat (stride 0): a huge broadcast view costs its storage only.

    Returns the reduced views and how many times each of their elements stands for.
    """
    repeat = 1
    for d in range(a.dim()):
        if a.size(d) > 1 and a.stride(d) == 0 and b.stride(d) == 0:
            repeat *= a.size(d)
            a, b = a.narrow(d, 0, 1), b.narrow(d, 0, 1)
    return a, b, repeat


def _compare_tensor(name: str, a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> TensorChange | None:
    if a.dtype != b.dtype:
        return TensorChange(name, "dtype", f"{a.dtype} -> {b.dtype}")
    if a.shape != b.shape:
        return TensorChange(name, "shape", f"{list(a.shape)} -> {list(b.shape)}")
    total = a.numel()
    a, b, repeat = _collapse_broadcast(a, b)
    numeric = a.dtype != torch.bool
    wide = torch.complex128 if a.is_complex() else torch.float64
    count, worst = 0, 0.0
    for x, y in zip(_blocks(a), _blocks(b), strict=True):
        if numeric:
            xw, yw = x.to(wide), y.to(wide)
            differ = ~torch.isclose(xw, yw, rtol=rtol, atol=atol, equal_nan=True)
            if bool(differ.any()):
                delta = (xw - yw).abs()[differ]
                finite = delta[torch.isfinite(delta)]
                worst = max(worst, float(finite.max()) if finite.numel() else math.inf)
        else:
            differ = x != y
        count += int(differ.sum()) * repeat
    if not count:
        return None
    return TensorChange(name, "values", f"{count} of {total} elements differ", worst if numeric else None)


def diff_checkpoints(
    a: str | os.PathLike[str], b: str | os.PathLike[str], *, atol: float = 0.0, rtol: float = 0.0
) -> CheckpointDiff:
    """Compare the checkpoints at ``a`` and ``b`` (any formats ``load_any`` reads, as stored).

    Values are compared a block at a time (memory stays bounded, even for huge broadcast views);
    NaN equals NaN. An element differs when ``|a - b| > atol + rtol * |b|`` (exact by default).

    Raises:
        FormatError, LegacyImportError, IntegrityError: a file cannot be read.
    """
    ca, cb = load_any(a, migrate=False), load_any(b, migrate=False)
    result = CheckpointDiff()
    ta, tb = dict(ca.tensors), dict(cb.tensors)
    result.added = sorted(set(tb) - set(ta))
    result.removed = sorted(set(ta) - set(tb))
    for name in ta:
        if name in tb:
            change = _compare_tensor(name, ta[name], tb[name], atol, rtol)
            if change is None:
                result.unchanged += 1
            else:
                result.changed.append(change)
    fields_a = {**ca.metadata, **{f"<{k}>": v for k, v in (("model_type", ca.model_type), ("name", ca.name))}}
    fields_b = {**cb.metadata, **{f"<{k}>": v for k, v in (("model_type", cb.model_type), ("name", cb.name))}}
    for key in sorted(set(fields_a) | set(fields_b), key=str):
        va, vb = fields_a.get(key, _MISSING), fields_b.get(key, _MISSING)
        if not _same(va, vb):
            result.metadata[str(key)] = (None if va is _MISSING else va, None if vb is _MISSING else vb)
    return result
