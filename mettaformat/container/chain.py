"""The reader's side of delta checkpoints: finding the base, checking it is the right one, and
rebuilding a tensor from its residual.

Opening a delta file opens its base (which opens its own base...): only headers are read. A base
is looked for where the file names it (a relative URI is relative to the delta file's folder),
then under the same file name beside the delta file, so a run folder that moved, or a base copied
next to its delta, is still found. Its identity (header checksum and file length) must be the one
the delta was written against. Chains deeper than ``MAX_CHAIN_DEPTH`` and cycles are refused.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mettaformat._torch import tensor_bytes
from mettaformat.container.delta import MAX_CHAIN_DEPTH, base_candidates
from mettaformat.container.delta_filter import apply_residual
from mettaformat.container.layout import checksum
from mettaformat.dtypes import dtype_from_tag, itemsize, tag_from_dtype
from mettaformat.errors import BaseCheckpointError, IntegrityError, MettaFormatError

if TYPE_CHECKING:
    from mettaformat.container.header import SectionEntry, TensorEntry
    from mettaformat.container.reader import LazyCheckpoint

__all__ = ["base_section", "chain", "chain_depth", "delta_names", "open_base", "rebuild"]

_opening = threading.local()


@contextmanager
def _opening_from(path: Path) -> Iterator[list[str]]:
    stack: list[str] = getattr(_opening, "stack", None) or []
    _opening.stack = stack
    stack.append(os.path.realpath(path))
    try:
        yield stack
    finally:
        stack.pop()


def open_base(ckpt: LazyCheckpoint) -> LazyCheckpoint:
    """Open and identify the base of the delta checkpoint ``ckpt``.

    Raises:
        BaseCheckpointError: missing, changed (identity mismatch), damaged, circular or too deep.
    """
    from mettaformat.container.reader import LazyCheckpoint

    assert ckpt.header.delta is not None
    ref = ckpt.header.delta.base
    if isinstance(ckpt.path, str):  # a remote object: its base is the object the URI names beside it
        found: Any = ref.uri if "://" in ref.uri else f"{ckpt.path.rsplit('/', 1)[0]}/{ref.uri}"
        candidates = [found]
    else:
        candidates = base_candidates(ckpt.path, ref.uri)
        found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise BaseCheckpointError(
            f"base {ref.uri!r} not found (looked at {', '.join(str(p) for p in candidates)}); the delta needs the "
            f"exact file it was written against", base=ref.uri)
    with _opening_from(ckpt.path) as stack:
        if os.path.realpath(found) in stack:
            raise BaseCheckpointError(f"base {found} is part of its own chain of bases (a cycle)", base=str(found),
                                      region="base chain")
        if len(stack) >= MAX_CHAIN_DEPTH:
            raise BaseCheckpointError(f"chain of bases deeper than {MAX_CHAIN_DEPTH} at base {found}", base=str(found),
                                      region="base chain")
        try:
            base = LazyCheckpoint(found, verify=ckpt.verify)
        except BaseCheckpointError:
            raise
        except (MettaFormatError, OSError) as e:
            raise BaseCheckpointError(f"base {found} cannot be read: {e}", base=str(found)) from e
    if (base.file_size, base.preamble.header_checksum) != (ref.file_length, ref.header_checksum):
        base.close()
        raise BaseCheckpointError(
            f"base {found} is not the file this delta was written against (its length or header checksum "
            f"differs: it was changed or replaced)", base=str(found),
            region="base identity")
    return base


def chain(ckpt: LazyCheckpoint) -> list[LazyCheckpoint]:
    """``ckpt`` and its bases, nearest first."""
    out = [ckpt]
    while out[-1].base is not None:
        out.append(out[-1].base)
    return out


def chain_depth(ckpt: LazyCheckpoint) -> int:
    """How many bases ``ckpt`` stands on (0 for a standalone file)."""
    return len(chain(ckpt)) - 1


def base_section(ckpt: LazyCheckpoint, section: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``section`` of the base of ``ckpt``, decoded at once on all cores."""
    assert ckpt.base is not None
    try:
        return ckpt.base.load_section(section)
    except MettaFormatError as e:
        raise BaseCheckpointError(f"base {ckpt.base.path}: section {section!r} cannot be read: {e}",
                                  base=str(ckpt.base.path)) from e


def rebuild(ckpt: LazyCheckpoint, s: SectionEntry, entry: TensorEntry, stored: torch.Tensor,
            base_tensor: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor ``entry`` of a delta file from its decoded residual ``stored`` (and the base's tensor when the
    caller has it), checked against the checksum of the result when the checkpoint verifies."""
    assert ckpt.header.delta is not None and ckpt.base is not None
    dtype, digest = ckpt.header.delta.tensors[s.name][entry.name]
    base = ckpt.base
    try:
        b = base._read_logical(entry.name, s.name) if base_tensor is None else base_tensor
    except MettaFormatError as e:
        raise BaseCheckpointError(f"base {base.path}: tensor {entry.name!r} cannot be read: {e}",
                                  base=str(base.path)) from e
    if tag_from_dtype(b.dtype) != dtype or tuple(b.shape) != entry.shape:
        raise BaseCheckpointError(
            f"base {base.path}: tensor {entry.name!r} is {tag_from_dtype(b.dtype)} {list(b.shape)}, the delta "
            f"needs {dtype} {list(entry.shape)}", base=str(base.path))
    data = apply_residual(stored.reshape(-1).view(torch.uint8), b.contiguous(), itemsize(dtype))
    if ckpt.verify and checksum(tensor_bytes(data)) != digest:
        raise IntegrityError(f"tensor {entry.name!r} rebuilt from base {base.path} does not match its checksum",
                             region=f"section {s.name!r}")
    return data.view(dtype_from_tag(dtype)).reshape(entry.shape)


def delta_names(ckpt: Any, section: str) -> dict[str, tuple[str, int]]:
    """The tensors of ``section`` stored as residuals (empty for a standalone file)."""
    delta = ckpt.header.delta
    return delta.tensors.get(section, {}) if delta is not None else {}

