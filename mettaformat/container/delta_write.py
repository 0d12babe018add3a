"""The writer's side of delta checkpoints: which tensors to store as differences from the base.

The writer decides per tensor by measuring: a tensor whose name, dtype and shape match a base
tensor is compressed both ways (on evenly spaced samples of large tensors) with the coders of the
section's codec, and stored as a residual only when that is smaller. New, reshaped or retyped
tensors, and tensors that changed so much that their residual is no smaller, stay standalone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from mettaformat._torch import contiguous_cpu, storage_key, tensor_bytes
from mettaformat.container.codecs.planes import ENTROPY, FLOAT_TAGS, coders_for, encode_plane, split_planes
from mettaformat.container.delta import MAX_CHAIN_DEPTH, BaseRef, DeltaInfo, stored_tag
from mettaformat.container.delta_filter import residual
from mettaformat.container.layout import checksum
from mettaformat.dtypes import dtype_from_tag, itemsize, tag_from_dtype
from mettaformat.errors import MettaFormatError, WriteError

__all__ = ["delta_sections"]

#: Bytes of a tensor the writer compresses both ways to choose (evenly spaced blocks of larger tensors).
_SAMPLE_BLOCK: Final = 64 << 10
_SAMPLE_BLOCKS: Final = 8
#: The residual must win by this factor: a tie is not worth a dependency on the base.
_MIN_GAIN: Final = 1.01


def _sample(data: torch.Tensor, width: int) -> torch.Tensor:
    """Evenly spaced blocks of a large tensor's bytes (all of a small one)."""
    n = data.numel()
    if n <= _SAMPLE_BLOCK * _SAMPLE_BLOCKS:
        return data
    block = _SAMPLE_BLOCK // width * width
    stride = (n - block) // (_SAMPLE_BLOCKS - 1) // width * width
    return torch.cat([data[i * stride : i * stride + block] for i in range(_SAMPLE_BLOCKS)])


def encoded_size(data: torch.Tensor, width: int, float_bits: bool, level: int | str | None) -> int:
    """Bytes the plane codec spends on (a sample of) ``data`` (uint8): what the writer compares."""
    coders = coders_for(level) if level is not None else (ENTROPY,)
    sample = _sample(data, width)
    if width == 1:
        return len(encode_plane(sample.numpy(), coders))
    planes = split_planes(sample, width, float_bits)
    return sum(len(encode_plane(np.ascontiguousarray(planes[i]), coders)) for i in range(width))


def better_as_delta(target: torch.Tensor, base: torch.Tensor, dtype: str, level: int | str | None
                    ) -> torch.Tensor | None:
    """The residual of ``target`` against ``base`` when it measures smaller than ``target`` alone, else None."""
    width = itemsize(dtype)
    stored = residual(target, base, width)
    t = target.reshape(-1).view(torch.uint8)
    if encoded_size(stored, width, False, level) * _MIN_GAIN < encoded_size(t, width, dtype in FLOAT_TAGS, level):
        return stored
    return None


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


def _decide(t: torch.Tensor, base: Any, name: str, section: str, level: int | str | None
            ) -> tuple[torch.Tensor, str, int] | None:
    """(residual, dtype, checksum of ``t``'s bytes) when ``t`` is smaller stored against the base, else None."""
    try:
        dtype = tag_from_dtype(t.dtype)
    except MettaFormatError:
        return None  # the stream writer reports the unsupported dtype
    width_tag = stored_tag(dtype)
    if width_tag is None or t.numel() == 0:
        return None
    try:
        b = base.get_tensor(name, section=section)
    except MettaFormatError as e:
        raise WriteError(f"base {base.path}: tensor {name!r} of section {section!r} cannot be read ({e})") from e
    if b.dtype != t.dtype or tuple(b.shape) != tuple(t.shape):
        return None
    target = contiguous_cpu(t, name)
    res = better_as_delta(target, b.contiguous(), dtype, level)
    if res is None:
        return None
    digest = checksum(tensor_bytes(target.reshape(-1).view(torch.uint8)))
    return res.view(dtype_from_tag(width_tag)).reshape(t.shape), dtype, digest


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
    table: dict[str, dict[str, tuple[str, int]]] = {}
    for section, tensors in sections.items():
        base_names = set(base.keys(section)) if section in base.sections else set()
        # Tied names share one decision (one storage, one residual), taken on a name the base has.
        decided: dict[Any, tuple[torch.Tensor, str, int] | None] = {}
        for name, t in tensors.items():
            key = storage_key(t) if isinstance(t, torch.Tensor) else None
            if name in base_names and (key is None or key not in decided):
                decision = _decide(t, base, name, section, level)
                if key is not None:
                    decided[key] = decision
                elif decision is not None:
                    decided[("untied", name)] = decision
        stored: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            key = storage_key(t) if isinstance(t, torch.Tensor) else None
            decision = decided.get(key if key is not None else ("untied", name))
            if decision is None:
                stored[name] = t
                continue
            stored[name], dtype, digest = decision
            table.setdefault(section, {})[name] = (dtype, digest)
        out[section] = stored
    ref = BaseRef(base_uri(Path(base.path), target), base.file_size, base.preamble.header_checksum)
    return out, DeltaInfo(ref, table)
