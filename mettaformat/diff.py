"""Compare two checkpoints of any format: tensors added, removed or changed, and metadata differences."""

from __future__ import annotations

import math
import os
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
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(
            torch.equal(a, b))
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def _compare_tensor(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorChange | None:
    if a.dtype != b.dtype:
        return TensorChange(name, "dtype", f"{a.dtype} -> {b.dtype}")
    if a.shape != b.shape:
        return TensorChange(name, "shape", f"{list(a.shape)} -> {list(b.shape)}")
    if torch.equal(a, b):
        return None
    if a.is_floating_point() or a.is_complex() or a.dtype not in (torch.bool,):
        delta = (a.to(torch.float64) - b.to(torch.float64)).abs()
        finite = delta[torch.isfinite(delta)]
        worst = float(finite.max()) if finite.numel() else math.inf
        count = int((a != b).sum())
        return TensorChange(name, "values", f"{count} of {a.numel()} elements differ", worst)
    return TensorChange(name, "values", f"{int((a != b).sum())} of {a.numel()} elements differ")


def diff_checkpoints(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> CheckpointDiff:
    """Compare the checkpoints at ``a`` and ``b`` (any formats ``load_any`` reads, as stored).

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
            change = _compare_tensor(name, ta[name], tb[name])
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
