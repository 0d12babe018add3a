"""Streaming, atomic container writer.

The header comes first in the file but holds values known only after the data is written
(checksums, compressed lengths, the file length). The writer therefore sizes the header with
placeholders of maximal msgpack width (checksums and frame tables are fixed-width already),
writes the sections after that reserved space, then writes the real header, which can only
be shorter, and leaves the difference as zero padding. Tensors are written one at a time, so
peak extra memory is one contiguous copy of the largest non-contiguous tensor (or a few
compressed frames), never a second copy of the model.

Every write goes through :func:`mettaformat._atomic.atomic_fd`: a crash leaves the old file
or the new one, never a broken one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

import torch

from mettaformat._atomic import atomic_fd
from mettaformat._pool import shared_pool
from mettaformat._torch import storage_key
from mettaformat.constants import (
    CHECKSUM_NAMES,
    FLAG_HAS_TRAILER,
    MFMT_DEFAULT_ALIGNMENT,
    MFMT_VERSION_MINOR,
    PREAMBLE_SIZE,
    Compression,
)
from mettaformat.container.codecs import Codec, RawCodec, ZstdCodec, resolve_codec
from mettaformat.container.codecs.base import pwrite_all
from mettaformat.container.delta import DeltaInfo
from mettaformat.container.delta_write import delta_sections
from mettaformat.container.header import Header, SectionEntry, encode_msgpack
from mettaformat.container.layout import Preamble, TrailerTail, align_offset, checksum
from mettaformat.container.stream import StreamPlan, entries_from_plan, plan_stream
from mettaformat.container.tree import encode_tree
from mettaformat.errors import MettaFormatError, WriteError

if TYPE_CHECKING:
    from mettaformat.container.reader import LazyCheckpoint

__all__ = ["save", "save_file", "write_container"]

_PLACEHOLDER: Final = (1 << 63) - 1  # encodes at msgpack's maximal integer width


def save_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    compression: Compression | Codec = "raw",
    level: int | str | None = None,
    durable: bool = False,
    base: str | os.PathLike[str] | LazyCheckpoint | None = None,
) -> None:
    """Save a state dict to ``path`` atomically.

    Args:
        tensors: name to tensor. Any dtype safetensors knows, any shape, any device, contiguous
            or not. Tensors that are the same view of the same storage are stored once and
            come back tied.
        path: target file; replaced atomically if it exists.
        metadata: a tree of plain values (see ``spec/FORMAT.md``, "Object trees").
        compression: a codec name, ``"raw"`` (zero-copy loading) or ``"zstd"`` (smaller, decoded on
            load), or a codec object such as ``ZstdCodec(level="max")`` or a registered third-party
            codec. ``"none"`` is a deprecated spelling of ``"raw"``.
        level: for codecs with levels (``None``: the codec's default). zstd: ``"fast"`` (= 1, the
            default: byte planes entropy-coded or stored), 2..22 (adds zstd's level on planes
            with repeats), ``"max"`` (archival: several times slower to write, 0.3-1.5% smaller).
        durable: also fsync the file before the rename and the directory after it, so the new
            version survives power loss (the rename is atomic either way).
        base: an earlier checkpoint (path or open :class:`LazyCheckpoint`) of the same model. Tensors
            that measure smaller as a difference from the base tensor of the same name, dtype and shape
            are stored that way (``spec/codecs/delta.md``); reading the file then needs this exact base.
            A ``"raw"`` compression becomes ``"zstd"`` (residuals exist to be compressed).

    Raises:
        WriteError: invalid names or values, unsupported dtypes, an unreadable base, or an I/O error
            (ENOSPC...). The previous content of ``path`` is untouched.

    Example:
        >>> mettaformat.save_file({"w": torch.zeros(2)}, "model.mfmt", metadata={"epoch": 3})
    """
    write_container(path, {"model": tensors}, metadata=metadata, compression=compression, level=level, durable=durable,
                    base=base)


def save(
    tensors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, Any] | None = None,
    compression: Compression | Codec = "raw",
    level: int | str | None = None,
) -> bytes:
    """Like :func:`save_file`, but return the file's bytes."""
    with tempfile.TemporaryFile() as f:
        _write(f.fileno(), {"model": tensors}, metadata, None, resolve_codec(compression, level))
        f.seek(0)
        return f.read()


def write_container(
    path: str | os.PathLike[str],
    sections: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    metadata: Mapping[str, Any] | None = None,
    trees: Mapping[str, Any] | None = None,
    compression: Compression | Codec = "raw",
    level: int | str | None = None,
    durable: bool = False,
    base: str | os.PathLike[str] | LazyCheckpoint | None = None,
    sync_dir: bool = True,
    reuse: str | os.PathLike[str] | None = None,
) -> None:
    """Write a container with several sections and object trees, atomically.

    Args:
        sections: section name to state dict (``"model"``, ``"legacy"``...).
        trees: tree name to a value; tensors inside a tree are stored in a section of the
            same name under their dotted path (``optimizer`` -> ``state.0.exp_avg``).
        sync_dir: with ``durable``, also fsync the directory after the rename; ``False`` when the
            caller syncs it once for several files.
        reuse: an existing file whose content is no longer needed: overwritten in place (and so
            gone) unless a reader holds a lock on it, then left alone and a new file written
            (see :func:`mettaformat._atomic.atomic_fd`).
        Others as for :func:`save_file`.

    Raises:
        WriteError: as for :func:`save_file`, or a tree whose name clashes with a section.
    """
    codec = resolve_codec(compression, level)
    if base is None:
        with atomic_fd(path, durable=durable, sync_dir=sync_dir, reuse=reuse) as fd:
            _write(fd, sections, metadata, trees, codec)
        return
    if isinstance(codec, RawCodec):
        codec = ZstdCodec()
    with _open_base(base) as base_ckpt:
        all_sections, encoded_trees = _split_trees(sections, trees)
        stored, delta = delta_sections(all_sections, base_ckpt, getattr(codec, "level", None), path)
        with atomic_fd(path, durable=durable, sync_dir=sync_dir, reuse=reuse) as fd:
            _write(fd, stored, metadata, None, codec, encoded_trees=encoded_trees, delta=delta)


@contextmanager
def _open_base(base: str | os.PathLike[str] | LazyCheckpoint) -> Iterator[LazyCheckpoint]:
    from mettaformat.container.reader import LazyCheckpoint

    if isinstance(base, LazyCheckpoint):
        yield base
        return
    try:
        ckpt = LazyCheckpoint(base)
    except (MettaFormatError, OSError) as e:
        raise WriteError(f"base {os.fspath(base)} cannot be opened: {e}", region="base") from e
    with ckpt:
        yield ckpt


def _split_trees(
    sections: Mapping[str, Mapping[str, torch.Tensor]], trees: Mapping[str, Any] | None
) -> tuple[dict[str, Mapping[str, torch.Tensor]], dict[str, Any]]:
    """Encode trees. A tensor already stored in a section is referenced there (a legacy object
    graph points into the model's weights); any other tensor goes to a section named after the
    tree, under its dotted path in the tree."""
    all_sections: dict[str, Mapping[str, torch.Tensor]] = dict(sections)
    stored: dict[Any, tuple[str, str]] = {}
    for section_name, tensors in sections.items():
        for tensor_name, t in tensors.items():
            key = storage_key(t) if isinstance(t, torch.Tensor) else None
            if key is not None:
                stored.setdefault(key, (section_name, tensor_name))
    encoded: dict[str, Any] = {}
    for tree_name, value in (trees or {}).items():
        if tree_name in all_sections:
            raise WriteError(f"tree {tree_name!r} has the same name as a section")
        found: dict[str, torch.Tensor] = {}

        def ref(
            t: torch.Tensor, path: str, _found: dict[str, torch.Tensor] = found, _section: str = tree_name
        ) -> tuple[str, str]:
            key = storage_key(t)
            if key is not None and key in stored:  # the same tensor referenced twice stays one tensor
                return stored[key]
            name = path or "value"
            while name in _found:
                name += "_"
            _found[name] = t
            if key is not None:
                stored[key] = (_section, name)
            return _section, name

        try:
            encoded[tree_name] = encode_tree(value, ref)
        except ValueError as e:
            raise WriteError(f"tree {tree_name!r}: {e}") from e
        if found:
            all_sections[tree_name] = found
    return all_sections, encoded


def _write(
    fd: int,
    sections: Mapping[str, Mapping[str, torch.Tensor]],
    metadata: Mapping[str, Any] | None,
    trees: Mapping[str, Any] | None,
    codec: Codec | Mapping[str, Codec],
    *,
    encoded_trees: dict[str, Any] | None = None,
    delta: DeltaInfo | None = None,
) -> int:
    """Write a container to ``fd``; ``codec`` is one codec for every section, or one per section name."""
    if encoded_trees is None:
        all_sections, encoded_trees = _split_trees(sections, trees)
    else:  # trees already split (a delta's residuals replace some of their tensors)
        all_sections = dict(sections)
    try:
        encoded_metadata = encode_tree(dict(metadata or {}))
    except ValueError as e:
        raise WriteError(f"metadata: {e}") from e
    plans = {name: plan_stream(tensors) for name, tensors in all_sections.items()}
    codecs = {name: codec[name] if isinstance(codec, Mapping) else codec for name in plans}
    if delta is not None:  # tied names are aliases of one data entry: the index lists that entry only
        delta = DeltaInfo(delta.base, {
            section: kept for section, names in delta.tensors.items()
            if (kept := {n: v for n, v in names.items() if n not in plans[section].aliases})
        }, delta.filter)

    def section(name: str, plan: StreamPlan, offset: int, length: int, frames: bytes,
                checksums: Mapping[str, int]) -> SectionEntry:
        return SectionEntry.from_entries(
            name=name,
            offset=offset,
            length=length,
            codec=codecs[name].name,
            configuration=codecs[name].configuration(),
            stream_length=plan.length,
            stream_header_length=len(plan.header),
            stream_header_checksum=checksum(plan.header),
            tensors=entries_from_plan(plan, checksums),
            aliases=plan.aliases,
            order=plan.order,
            frames=frames,
        )

    # Every field of the index is fixed-width, so placeholders of maximal width size the header.
    entries = [
        section(name, plan, _PLACEHOLDER, _PLACEHOLDER, bytes(codecs[name].frame_table_size(plan)), {})
        for name, plan in plans.items()
    ]
    header = Header(
        file_length=_PLACEHOLDER,
        checksum=CHECKSUM_NAMES[0],
        sections=tuple(entries),
        metadata=encoded_metadata,
        trees=encoded_trees,
        delta=delta,
    )
    reserved = len(encode_msgpack(header.to_msgpack()))
    position = align_offset(PREAMBLE_SIZE + reserved, MFMT_DEFAULT_ALIGNMENT)
    written: list[SectionEntry] = []
    pool = shared_pool()
    for entry in entries:
        plan = plans[entry.name]
        codec_here = codecs[entry.name]
        result = codec_here.write(fd, position, plan, pool)
        if len(result.frames) != len(entry.frames):
            raise WriteError(
                f"codec {codec_here.name!r} wrote a {len(result.frames)}-byte frame table for section {entry.name!r} "
                f"after declaring {len(entry.frames)} bytes (frame_table_size)"
            )
        written.append(section(entry.name, plan, position, result.length, result.frames, result.checksums))
        position = align_offset(position + result.length, MFMT_DEFAULT_ALIGNMENT)
    data_end = written[-1].end if written else align_offset(PREAMBLE_SIZE + reserved, MFMT_DEFAULT_ALIGNMENT)
    # Build the section maps once; only the file length changes between the encodings below.
    final = Header(file_length=0, checksum=header.checksum, sections=tuple(written), metadata=header.metadata,
                   trees=header.trees, delta=delta)
    index_map = final.index_msgpack()
    file_length = data_end + 32
    # The file length is part of the index, and its msgpack width can change the index length.
    for _ in range(4):
        index_map["file_length"] = file_length
        index = encode_msgpack(index_map)
        if data_end + len(index) + 32 == file_length:
            break
        file_length = data_end + len(index) + 32
    header_bytes = encode_msgpack({**final.to_msgpack(), **index_map})
    if len(header_bytes) > reserved:
        raise WriteError(f"internal: header grew from {reserved} to {len(header_bytes)} bytes")
    tail = TrailerTail(index_length=len(index), index_checksum=checksum(index), file_length=file_length)
    pwrite_all(fd, index + tail.pack(), data_end)
    preamble = Preamble.for_header(header_bytes, FLAG_HAS_TRAILER, MFMT_VERSION_MINOR)
    pwrite_all(fd, preamble.pack() + header_bytes, 0)
    regions = [(0, PREAMBLE_SIZE + len(header_bytes)), *((s.offset, s.end) for s in written), (data_end, file_length)]
    _zero_padding(fd, regions)
    os.ftruncate(fd, file_length)
    return file_length


def _zero_padding(fd: int, regions: list[tuple[int, int]]) -> None:
    """Write the zeros between the written ``(start, end)`` regions: ``fd`` may be a reused file
    whose old bytes would otherwise remain there (in a new file they are holes, read as zeros)."""
    position = 0
    for start, end in sorted(regions):
        if start > position:
            pwrite_all(fd, bytes(start - position), position)
        position = max(position, end)
