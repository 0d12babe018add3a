"""torch's default DCP layout (``FileSystemWriter``), read without ``pickle`` or ``torch.load``.

That layout commits with ``.metadata``, a pickle of DCP's ``Metadata``, and stores every item
as a ``torch.save`` archive inside ``__<rank>_<n>.distcp`` files. Both are interpreted by the
legacy importer's pickle machine, which records classes as inert data and runs nothing: the
records are then checked field by field (types, ranges, file names), so a tampered or hostile
directory is refused with an error instead of executing code.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from mettaformat.container.tree import LegacyObject
from mettaformat.dcp.index import TORCH_METADATA_NAME
from mettaformat.errors import FormatError, LegacyFormatError, LegacyUnsupportedError
from mettaformat.legacy.limits import DEFAULT_LIMITS
from mettaformat.legacy.torchzip import load_torch_zip, open_torch_zip
from mettaformat.legacy.unpickler import unpickle

__all__ = ["TorchLayout", "TorchShard", "read_torch_layout", "read_torch_item"]

_MODULE: Final = "torch.distributed.checkpoint.metadata"
_DISTCP: Final = re.compile(r"__\d{1,6}_\d{1,6}\.distcp")
MAX_METADATA_BYTES: Final = 256 << 20


@dataclass(frozen=True)
class TorchShard:
    """Where a stored item lives: file, byte offset and length of its ``torch.save`` archive."""

    file: str
    offset: int
    length: int


@dataclass
class TorchLayout:
    """The checked content of a ``.metadata``.

    Attributes:
        tensors: name to ``(dtype, global shape, [(offsets, sizes, TorchShard)])``.
        objects: non-tensor item name to where its archive is.
        planner_data: the flattening map (name to key path), if recorded.
        globals_seen: every class path the pickle named (for reports).
    """

    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], list[tuple[tuple[int, ...], tuple[int, ...], TorchShard]]]]
    objects: dict[str, TorchShard]
    planner_data: dict[str, tuple[Any, ...]] | None
    globals_seen: set[tuple[str, str]]


def _record(value: Any, name: str, where: str) -> dict[str, Any]:
    """The state of a recorded DCP dataclass, checked to be of the expected class."""
    module = "torch.distributed.checkpoint.filesystem" if name == "_StorageInfo" else _MODULE
    if not isinstance(value, LegacyObject) or value.class_path != f"{module}.{name}":
        got = value.class_path if isinstance(value, LegacyObject) else type(value).__name__
        raise LegacyFormatError(f"{where}: expected a {name} record, found {got}", region=TORCH_METADATA_NAME)
    state = value.state if isinstance(value.state, dict) else {}
    return state


def _ints(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, torch.Size)) or not all(type(v) is int and v >= 0 for v in value):
        raise LegacyFormatError(f"{where}: expected a size of non-negative ints", region=TORCH_METADATA_NAME)
    return tuple(value)


def _storage(value: Any, where: str, directory: Path) -> TorchShard:
    state = _record(value, "_StorageInfo", where)
    file, offset, length = state.get("relative_path"), state.get("offset"), state.get("length")
    if not isinstance(file, str) or not _DISTCP.fullmatch(file):
        raise LegacyFormatError(f"{where}: file {file!r:.80} is not a .distcp name", region=TORCH_METADATA_NAME)
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        raise LegacyFormatError(f"{where}: bad offset or length", region=TORCH_METADATA_NAME)
    if state.get("transform_descriptors"):
        raise LegacyUnsupportedError(f"{where}: stored with transforms {state['transform_descriptors']!r:.80}",
                                     region=TORCH_METADATA_NAME)
    try:
        size = (directory / file).stat().st_size
    except FileNotFoundError:
        raise FormatError(f"{directory / file} is named by .metadata but missing", region="file") from None
    if offset + length > size:
        raise FormatError(f"{where}: bytes {offset}..{offset + length} lie beyond {file}'s {size}", region=file)
    return TorchShard(file, offset, length)


def read_torch_layout(directory: Path) -> TorchLayout:
    """Interpret and check ``directory/.metadata`` (nothing in it is executed).

    Raises:
        LegacyImportError: a malformed pickle, or records that are not DCP's metadata.
        FormatError: files it names are missing or too short.
    """
    path = directory / TORCH_METADATA_NAME
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise FormatError(f"{path} is larger than {MAX_METADATA_BYTES} bytes", region=TORCH_METADATA_NAME)
    value, seen = unpickle(path.read_bytes(), region=str(path))
    meta = _record(value, "Metadata", str(path))
    items, storage = meta.get("state_dict_metadata"), meta.get("storage_data")
    if not isinstance(items, dict) or not isinstance(storage, dict):
        raise LegacyFormatError(f"{path}: no state_dict_metadata or storage_data map", region=TORCH_METADATA_NAME)
    where_stored: dict[tuple[str, tuple[int, ...] | None], TorchShard] = {}
    for key, info in storage.items():
        index = _record(key, "MetadataIndex", f"{path}: storage key")
        fqn, offset = index.get("fqn"), index.get("offset")
        if not isinstance(fqn, str):
            raise LegacyFormatError(f"{path}: a storage key has no name", region=TORCH_METADATA_NAME)
        where_stored[(fqn, None if offset is None else _ints(offset, f"{path}: {fqn}"))] = _storage(
            info, f"{path}: {fqn}", directory)
    layout = TorchLayout({}, {}, None, seen)
    for fqn, item in items.items():
        if not isinstance(fqn, str):
            raise LegacyFormatError(f"{path}: an item name is not a string", region=TORCH_METADATA_NAME)
        where = f"{path}: {fqn!r:.80}"
        if isinstance(item, LegacyObject) and item.name == "BytesStorageMetadata":
            _record(item, "BytesStorageMetadata", where)
            stored = where_stored.get((fqn, None))
            if stored is None:
                raise LegacyFormatError(f"{where}: no storage", region=TORCH_METADATA_NAME)
            layout.objects[fqn] = stored
            continue
        state = _record(item, "TensorStorageMetadata", where)
        props = _record(state.get("properties"), "TensorProperties", where)
        args = state["properties"].state if isinstance(state["properties"].state, tuple) else ()
        dtype = props.get("dtype") if props else (args[0] if args else None)
        if not isinstance(dtype, torch.dtype):
            raise LegacyFormatError(f"{where}: no dtype", region=TORCH_METADATA_NAME)
        chunks = []
        raw_chunks = state.get("chunks")
        for chunk in raw_chunks if isinstance(raw_chunks, list) else ():
            c = _record(chunk, "ChunkStorageMetadata", where)
            offsets, sizes = _ints(c.get("offsets"), where), _ints(c.get("sizes"), where)
            stored = where_stored.get((fqn, offsets))
            if stored is None:
                raise LegacyFormatError(f"{where}: no storage for the chunk at {offsets}", region=TORCH_METADATA_NAME)
            chunks.append((offsets, sizes, stored))
        layout.tensors[fqn] = (dtype, _ints(state.get("size"), where), chunks)
    planner_data = meta.get("planner_data")
    if isinstance(planner_data, dict) and all(
        isinstance(k, str) and isinstance(v, tuple) and all(type(p) in (str, int) for p in v)
        for k, v in planner_data.items()
    ):
        layout.planner_data = planner_data
    return layout


def read_torch_item(directory: Path, stored: TorchShard) -> tuple[Any, set[tuple[str, str]]]:
    """Interpret one item's ``torch.save`` archive: ``(a tensor or a tree of inert values, class paths named)``."""
    with open(directory / stored.file, "rb") as f:
        f.seek(stored.offset)
        data = bytearray(f.read(stored.length))
    if len(data) != stored.length:
        raise FormatError(f"{directory / stored.file} ended early", region=stored.file, offset=stored.offset)
    return load_torch_zip(open_torch_zip(data, limits=DEFAULT_LIMITS), limits=DEFAULT_LIMITS)


def file_sizes(directory: Path) -> int:
    return sum(e.stat().st_size for e in os.scandir(directory) if e.is_file())
