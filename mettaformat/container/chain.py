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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import torch

from mettaformat._pool import pool_for
from mettaformat.container.delta import MAX_CHAIN_DEPTH, DeltaTensor, base_candidates
from mettaformat.container.delta_filter import apply_residual_in_place
from mettaformat.container.delta_planes import as_tensor, plane_plan, start_rebuild
from mettaformat.container.verify import is_verified, mark_verified
from mettaformat.dtypes import dtype_from_tag, itemsize, tag_from_dtype
from mettaformat.errors import BaseCheckpointError, IntegrityError, MettaFormatError, naming_file

if TYPE_CHECKING:
    from mettaformat.container.header import SectionEntry, TensorEntry
    from mettaformat.container.reader import LazyCheckpoint

__all__ = ["base_tensors", "chain", "chain_depth", "delta_names", "needs_rebuild_check", "open_base", "saved_tensors"]

_opening = threading.local()


@contextmanager
def _opening_from(path: str | os.PathLike[str]) -> Iterator[list[str]]:
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


@contextmanager
def reading_base(base: LazyCheckpoint, what: str) -> Iterator[None]:
    """Errors of the base while reading ``what`` become a BaseCheckpointError naming the base (the delta's
    entry point names the delta file as well)."""
    try:
        with naming_file(base.path, container=True):
            yield
    except BaseCheckpointError:
        raise
    except MettaFormatError as e:
        raise BaseCheckpointError(f"base {base.path}: {what} cannot be read: {e}", base=str(base.path)) from e


def base_tensors(ckpt: LazyCheckpoint, section: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of ``section`` of the base of ``ckpt`` as saved (rebuilt through its own chain),
    decoded at once on all cores; only the tensors the residuals need are read. A raw base's tensors are
    views of its mapping, neither copied nor hashed: the rebuilt bytes' checksum vouches for the base
    bytes a residual uses, and a rebuild reads only their high bytes."""
    base = ckpt.base
    assert base is not None
    with reading_base(base, f"section {section!r}"):
        _prefetch(base)
        base._verify_structure_once()
        s = base.header.section(section)
        entries = {name: s.index.get(name) if s is not None else None for name in names}
        missing = [name for name, e in entries.items() if e is None]
        if s is None or missing:
            raise BaseCheckpointError(f"base {base.path} has no tensor {missing[0]!r} in section {section!r}",
                                      base=str(base.path))
        unique = list({id(e): e for e in entries.values() if e is not None}.values())
        decoded: dict[str, torch.Tensor] = {}
        if base._readers[s.name].zero_copy and base._src.mappable and not base.copy:
            owner = (base._mapped(), base._src.owner())[1]
            residuals = delta_names(base, s.name)
            decoded = {e.name: base._mapped_tensor(s, e, owner) for e in unique if e.name not in residuals}
        rest = [e for e in unique if e.name not in decoded]
        decoded.update(saved_tensors(base, s, rest) if rest else {})
    return {name: decoded[e.name] for name, e in entries.items() if e is not None}


def _in_thread(fn: Callable[[], dict[str, torch.Tensor]]) -> Callable[[], dict[str, torch.Tensor]]:
    """Start ``fn`` on a thread of its own (its codec jobs share the pool with the caller's); the returned
    function waits for it and returns its result or raises its error."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name="mettaformat-base", daemon=True)
    thread.start()

    def result() -> dict[str, torch.Tensor]:
        thread.join()
        if "error" in box:
            raise box["error"]
        return cast(dict[str, torch.Tensor], box["value"])

    return result


def saved_tensors(ckpt: LazyCheckpoint, s: SectionEntry, entries: list[TensorEntry] | None = None
                  ) -> dict[str, torch.Tensor]:
    """The data entries of ``s`` (all, or ``entries``) as saved, each in memory of its own (by data entry name).

    For a delta file, residuals whose base tensor is a zstd plane group cut like them rebuild chunk by
    chunk from the base's high planes (``delta_planes.py``); the other residuals and the base tensors
    they need decode at the same time on all cores, and each is then rebuilt in place, block by block,
    and hashed while in the cache."""
    chosen = list(s.tensors) if entries is None else entries
    deltas = delta_names(ckpt, s.name)
    plans = [p for e in chosen if e.name in deltas if (p := plane_plan(ckpt, s, e, deltas[e.name])) is not None]
    if plans:
        assert ckpt.base is not None
        with reading_base(ckpt.base, "its structure"):
            ckpt.base._verify_structure_once()
    by_plan = {p.entry.name for p in plans}
    rest = [e for e in chosen if e.name not in by_plan]
    needed = [e for e in rest if e.name in deltas]
    started = start_rebuild(ckpt, s, plans)
    bases = _in_thread(lambda: base_tensors(ckpt, s.name, [e.name for e in needed])) if needed else None
    try:
        out = _decode(ckpt, s, rest)
    finally:
        base_of = bases() if bases is not None else {}
        for _, _, futures, _ in started:
            for future in futures:
                future.exception()  # every chunk job finished before an error moves on
    for plan, data, futures, hasher in started:
        for future in futures:
            future.result()
        if hasher is not None:
            _check_rebuilt(ckpt, s, plan.entry, hasher.intdigest())
        out[plan.entry.name] = as_tensor(plan, data)
    if needed:
        pool = pool_for(sum(e.nbytes for e in needed))
        rebuilt = pool.map(lambda e: _rebuild_in_place(ckpt, s, e, out[e.name], base_of[e.name]), needed)
        out.update(zip((e.name for e in needed), rebuilt, strict=True))
    return out


# The reader's whole-section primitives this module builds on.
def _prefetch(ckpt: LazyCheckpoint) -> None:
    if not ckpt._src.mappable:  # one parallel fetch of what the structure checks and codecs slice
        ckpt._src.prefetch(ckpt._unmapped_ranges())


def _decode(ckpt: LazyCheckpoint, s: SectionEntry, entries: list[TensorEntry]) -> dict[str, torch.Tensor]:
    """``entries`` as stored, checked, each in memory of its own."""
    return ckpt._read_copy(s, tuple(entries)) if ckpt._readers[s.name].zero_copy else ckpt._decode_all(s, entries)


def needs_rebuild_check(ckpt: LazyCheckpoint, s: SectionEntry, entry: TensorEntry) -> bool:
    """Verifying, and this very file's tensor was not rebuilt and checked before in this process."""
    key = (f"{s.name}\x00rebuilt", entry.name)
    return ckpt.verify and (not is_verified(ckpt._identity, key) or ckpt._src.identity() != ckpt._identity)


def _check_rebuilt(ckpt: LazyCheckpoint, s: SectionEntry, entry: TensorEntry, got: int) -> None:
    assert ckpt.header.delta is not None and ckpt.base is not None
    if got != ckpt.header.delta.tensors[s.name][entry.name].checksum:
        raise IntegrityError(f"tensor {entry.name!r} rebuilt from base {ckpt.base.path} does not match its "
                             f"checksum", region=f"section {s.name!r}")
    mark_verified(ckpt._identity, [(f"{s.name}\x00rebuilt", entry.name)])


def _rebuild_in_place(ckpt: LazyCheckpoint, s: SectionEntry, entry: TensorEntry, stored: torch.Tensor,
                      b: torch.Tensor) -> torch.Tensor:
    """``stored`` (a residual in memory of its own) turned into the tensor ``entry``; the rebuilt bytes are
    hashed unless this very file's tensor was rebuilt and checked before in this process."""
    assert ckpt.header.delta is not None and ckpt.base is not None
    how: DeltaTensor = ckpt.header.delta.tensors[s.name][entry.name]
    if tag_from_dtype(b.dtype) != how.dtype or tuple(b.shape) != entry.shape:
        raise BaseCheckpointError(
            f"base {ckpt.base.path}: tensor {entry.name!r} is {tag_from_dtype(b.dtype)} {list(b.shape)}, the delta "
            f"needs {how.dtype} {list(entry.shape)}", base=str(ckpt.base.path))
    data = stored.reshape(-1).view(torch.uint8)
    check = needs_rebuild_check(ckpt, s, entry)
    got = apply_residual_in_place(data, b, itemsize(how.dtype), how.high, digest=check)
    if check:
        assert got is not None
        _check_rebuilt(ckpt, s, entry, got)
    return data.view(dtype_from_tag(how.dtype)).reshape(entry.shape)


def delta_names(ckpt: Any, section: str) -> dict[str, DeltaTensor]:
    """The tensors of ``section`` stored as residuals (empty for a standalone file)."""
    delta = ckpt.header.delta
    return delta.tensors.get(section, {}) if delta is not None else {}

