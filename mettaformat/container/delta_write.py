"""The writer's side of delta checkpoints: which tensors to store as differences from the base.

The writer decides per tensor by measuring: a tensor whose name, dtype and shape match a base
tensor is compressed alone and as residuals of 1, 2... high bytes (until one more measures larger)
on a sample (evenly spaced blocks of a large tensor), plane by plane with the coders of the
section's codec. The low planes of every residual are the tensor's own, so each is coded once. It is stored as the
residual that measures smallest (the fewest high bytes within 1% of it: each costs a base plane
at load) when that is at least 3% smaller than alone; the residual of the whole tensor is computed
only then. New, reshaped or retyped tensors, and tensors that changed so much that their residual
saves little, stay standalone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from mettaformat._pool import shared_pool
from mettaformat._torch import contiguous_cpu, storage_key, tensor_bytes
from mettaformat.container.codecs.planes import ENTROPY, FLOAT_TAGS, coders_for, encode_plane, split_planes
from mettaformat.container.delta import (
    FILTER,
    FILTER_WHOLE,
    MAX_CHAIN_DEPTH,
    BaseRef,
    DeltaInfo,
    DeltaTensor,
    stored_tag,
)
from mettaformat.container.delta_filter import residual
from mettaformat.container.layout import checksum
from mettaformat.dtypes import dtype_from_tag, itemsize, tag_from_dtype
from mettaformat.errors import MettaFormatError, WriteError

__all__ = ["delta_sections"]

#: The filter written: ``FILTER``; the conformance vectors of 3.3 are made with ``FILTER_WHOLE`` (every
#: byte differenced), which readers keep reading.
WRITE_FILTER: str = FILTER
#: The writer measures both ways on evenly spaced blocks of a tensor (all of a small one): compressing
#: whole tensors twice made a delta save 5-16x slower than a standalone one.
_SAMPLE_BLOCK: Final = 16 << 10
_SAMPLE_BLOCKS: Final = 8
#: The residual must save this much: each tensor stored as one costs a decode of the base's high planes
#: and a rebuild pass at load.
_MIN_GAIN: Final = 1.03
#: Smaller tensors stay standalone: on the Metta fixtures their residuals saved 40 bytes of 1.5 MB, while
#: reading their base tensors (whole, outside the plane path) took a quarter of the delta's load time.
_MIN_BYTES: Final = 4096
#: Fewer high bytes are preferred unless more save this much (each is a base plane decoded at load).
_HIGH_GAIN: Final = 1.01


def _sample(data: np.ndarray, width: int) -> np.ndarray:
    """Evenly spaced blocks of a large tensor's bytes (all of a small one), as whole elements."""
    n = len(data)
    if n <= _SAMPLE_BLOCK * _SAMPLE_BLOCKS:
        return data
    block = _SAMPLE_BLOCK // width * width
    stride = (n - block) // (_SAMPLE_BLOCKS - 1) // width * width
    return np.concatenate([data[i * stride : i * stride + block] for i in range(_SAMPLE_BLOCKS)])


def _plane_sizes(data: np.ndarray, width: int, float_bits: bool, coders: tuple[tuple[int, ...], ...],
                 planes: range) -> list[int]:
    """Bytes the plane codec spends on each of ``planes`` of ``data`` (uint8, whole elements)."""
    if width == 1:
        return [len(encode_plane(data, coders))]
    split = split_planes(torch.from_numpy(data), width, float_bits)
    return [len(encode_plane(np.ascontiguousarray(split[i]), coders)) for i in planes]


def choose_high(target: torch.Tensor, base: torch.Tensor, dtype: str, level: int | str | None) -> int | None:
    """How many high bytes of ``target`` to store as differences from ``base`` (same dtype and shape,
    contiguous), measured on a sample of both; None when storing it alone measures better."""
    width = itemsize(dtype)
    coders = coders_for(level) if level is not None else (ENTROPY,)
    t = _sample(target.reshape(-1).view(torch.uint8).numpy(), width)
    b = _sample(base.reshape(-1).view(torch.uint8).numpy(), width)
    own = _plane_sizes(t, width, False, coders, range(width - 1)) if width > 1 else []
    alone = own[: width - 2] + _plane_sizes(t, width, True, coders, range(width - 2, width)) \
        if dtype in FLOAT_TAGS else own + _plane_sizes(t, width, False, coders, range(width - 1, width))
    sizes: dict[int, int] = {}
    for high in range(1, width + 1):
        stored = residual(t, b, width, high).numpy()
        sizes[high] = sum(own[: width - high]) + sum(_plane_sizes(stored, width, False, coders,
                                                                  range(width - high, width)))
        if high > 1 and sizes[high] > sizes[high - 1]:
            break  # once a high byte adds noise, more add more (no choice changed on the benchmark inputs)
    best = min(sizes.values())
    if best * _MIN_GAIN >= sum(alone):
        return None
    return min(high for high, size in sizes.items() if size <= best * _HIGH_GAIN)


def base_uri(base_path: Path, target: str | os.PathLike[str] | None) -> str:
    """The base as the file names it: relative to the target's folder when there is one (so a run folder
    can move as a whole), else absolute."""
    absolute = base_path.resolve()
    if target is None:
        return str(absolute)
    try:
        return os.path.relpath(absolute, Path(target).resolve().parent)
    except ValueError:  # another drive (Windows)
        return str(absolute)


def _decide(t: torch.Tensor, b: torch.Tensor | None, name: str, level: int | str | None
            ) -> tuple[torch.Tensor, DeltaTensor] | None:
    """(residual, how it is stored) when ``t`` is smaller stored against the base tensor ``b``, else None."""
    try:
        dtype = tag_from_dtype(t.dtype)
    except MettaFormatError:
        return None  # the stream writer reports the unsupported dtype
    width_tag = stored_tag(dtype)
    if b is None or width_tag is None or t.numel() * t.element_size() < _MIN_BYTES or b.dtype != t.dtype or \
            tuple(b.shape) != tuple(t.shape):
        return None
    target = contiguous_cpu(t, name)
    b = b.contiguous()
    high = choose_high(target, b, dtype, level)
    if high is None:
        return None
    if WRITE_FILTER == FILTER_WHOLE:
        high = itemsize(dtype)
    digest = checksum(tensor_bytes(target.reshape(-1).view(torch.uint8)))
    res = residual(target, b, itemsize(dtype), high)
    return res.view(dtype_from_tag(width_tag)).reshape(t.shape), DeltaTensor(dtype, digest, high)


def _base_tensors(base: Any, section: str, names: list[str], candidates: Mapping[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """The base's tensors of ``names`` that could take a delta (same dtype and shape), decoded at once."""
    from mettaformat.container.chain import delta_names, saved_tensors  # the reader imports the writer's codecs

    s = base.header.section(section)
    as_saved = delta_names(base, section)  # a base that is a delta stores some tensors as unsigned residuals
    entries = {}
    for name in names:
        entry = s.index.get(name)
        t = candidates[name]
        if entry is None or entry.shape != tuple(t.shape):
            continue
        if as_saved.get(entry.name, (entry.dtype,))[0] == _tag_or_none(t):
            entries[name] = entry
    unique = list({id(e): e for e in entries.values()}.values())
    try:
        decoded = saved_tensors(base, s, unique) if unique else {}
    except MettaFormatError as e:
        raise WriteError(f"base {base.path}: section {section!r} cannot be read ({e})", region="base") from e
    return {name: decoded[e.name] for name, e in entries.items()}


def _tag_or_none(t: Any) -> str | None:
    try:
        return tag_from_dtype(t.dtype) if isinstance(t, torch.Tensor) else None
    except MettaFormatError:
        return None


def delta_sections(
    sections: Mapping[str, Mapping[str, torch.Tensor]], base: Any, level: int | str | None,
    target: str | os.PathLike[str] | None,
) -> tuple[dict[str, dict[str, torch.Tensor]], DeltaInfo]:
    """``sections`` with the tensors that measure smaller as residuals against the open checkpoint
    ``base``, and the header's description of them."""
    from mettaformat.container.chain import chain_depth  # the reader side imports the writer's codecs

    if chain_depth(base) + 1 > MAX_CHAIN_DEPTH:
        raise WriteError(f"{base.path} is already {chain_depth(base)} bases deep; a delta on it would exceed "
                         f"{MAX_CHAIN_DEPTH} (save a full checkpoint)")
    out: dict[str, dict[str, torch.Tensor]] = {}
    table: dict[str, dict[str, DeltaTensor]] = {}
    for section, tensors in sections.items():
        base_names = set(base.keys(section)) if section in base.sections else set()
        # Tied names share one decision (one storage, one residual), taken on a name the base has.
        firsts: dict[Any, str] = {}
        for name, t in tensors.items():
            key = storage_key(t) if isinstance(t, torch.Tensor) else ("untied", name)
            if name in base_names and key not in firsts:
                firsts[key] = name
        bases = _base_tensors(base, section, list(firsts.values()), tensors) if firsts else {}
        jobs = [(tensors[n], bases.get(n), n, level) for n in firsts.values()]
        decided = dict(zip(firsts, shared_pool().map(lambda job: _decide(*job), jobs), strict=True))
        jobs.clear()
        bases.clear()  # the base's tensors are not needed while the residuals are written
        stored: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            key = storage_key(t) if isinstance(t, torch.Tensor) else ("untied", name)
            decision = decided.get(key)
            if decision is None:
                stored[name] = t
                continue
            stored[name], how = decision
            table.setdefault(section, {})[name] = how
        out[section] = stored
    ref = BaseRef(base_uri(Path(base.path), target), base.file_size, base.preamble.header_checksum)
    return out, DeltaInfo(ref, table, WRITE_FILTER)
