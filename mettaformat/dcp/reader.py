"""``MettaStorageReader``: rebuild DCP's ``Metadata`` from the index and the containers' headers.

Nothing is unpickled. The index says which files form the committed save; each file must have
the recorded size and header checksum, and its shards must fit inside their tensor's global
shape without overlapping, covering it exactly. Only then is a ``Metadata`` handed to DCP, so a
tampered directory fails here with an error naming the file, not later inside torch.

Shards are read from memory-mapped containers: each request copies exactly the slice the
loading rank needs. With ``verify=True`` (the default) a shard's checksum is checked the first
time any part of it is read, which reads that whole shard once.

A later save may overwrite a superseded rank file in place (see
:class:`~mettaformat.dcp.MettaStorageWriter`'s ``keep_previous``). Every rank file is therefore
opened through :func:`open_rank_file`, which holds a shared ``flock`` on it while it is open; a
writer never overwrites a locked file. A file overwritten before it was opened is not under its
name any more (each save has its own names), and that is reported, never read torn.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not a POSIX system: writers never reuse files there either
    fcntl = None  # type: ignore[assignment]

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from mettaformat.container.reader import LazyCheckpoint
from mettaformat.container.tree import decode_tree
from mettaformat.dcp.index import DcpIndex, parse_shape, read_index
from mettaformat.dcp.planners import assign_object, check_tensor_target
from mettaformat.dcp.writer import OBJECTS_TREE, SHARDS_SECTION, StoredItem
from mettaformat.dtypes import dtype_from_tag
from mettaformat.errors import FormatError, IntegrityError, LayoutError, MettaFormatError

__all__ = ["MettaStorageReader", "ShardRecord", "check_coverage", "decode_object", "open_rank_file", "read_layout"]

MAX_SHARDS = 1_000_000


class ShardRecord:
    """One stored shard: which tensor, where in it, and where it is stored."""

    __slots__ = ("fqn", "item", "offsets", "sizes")

    def __init__(self, fqn: str, offsets: tuple[int, ...], sizes: tuple[int, ...], item: StoredItem) -> None:
        self.fqn, self.offsets, self.sizes, self.item = fqn, offsets, sizes, item


@contextmanager
def open_rank_file(directory: Path, name: str, *, verify: bool = True) -> Iterator[LazyCheckpoint]:
    """Open the rank file ``name`` of ``directory``, holding a shared lock on it until it is closed.

    Tensors must be copied out before it closes (a later save may then overwrite the file).

    Raises:
        FormatError: the file is missing, or a newer save has claimed it since the index was read.
    """
    path = directory / name
    replaced = f"{path} was replaced by a newer save while being read; read the checkpoint again"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FormatError(f"{path} is named by the index but missing", region="file") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # a writer is overwriting it
                raise FormatError(replaced, region="file") from None
        try:  # locked, the file keeps its name: names are never reused, and a writer renames only unlocked files
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:
            raise FormatError(replaced, region="file")
        with LazyCheckpoint(path, verify=verify) as ckpt:
            yield ckpt
    finally:
        os.close(fd)


def read_layout(directory: Path, *, verify: bool = False) -> tuple[DcpIndex, list[ShardRecord], dict[str, str]]:
    """Read and cross-check the index and every rank file's header.

    Returns:
        ``(index, shards, objects)``; ``objects`` maps each non-tensor item to its file.

    Raises:
        FormatError, IntegrityError: naming the file that is missing, changed or inconsistent.
    """
    index = read_index(directory)
    shards: list[ShardRecord] = []
    objects: dict[str, str] = {}
    for record in index.files.values():
        path = directory / record.name
        with open_rank_file(directory, record.name, verify=verify) as ckpt:
            if ckpt.file_size != record.size or ckpt.preamble.header_checksum != record.header_checksum:
                raise IntegrityError(f"{path} is not the file the index committed (size or header changed)",
                                     region="file")
            shards.extend(_file_shards(ckpt, index, record.name))
            raw_objects = ckpt.header.trees.get(OBJECTS_TREE, {})
            if not isinstance(raw_objects, dict):
                raise FormatError(f"{path}: object tree {OBJECTS_TREE!r} is not a map", region="trees")
            for fqn in raw_objects:
                if fqn not in index.objects or fqn in objects:
                    raise FormatError(f"{path}: object {fqn!r:.80} is not in the index or stored twice",
                                      region="trees")
                objects[fqn] = record.name
    missing = [o for o in index.objects if o not in objects]
    if missing:
        raise FormatError(f"{directory}: objects {missing[:5]} are in the index but in no file", region="index")
    _check_coverage(directory, index, shards)
    return index, shards, objects


def decode_object(ckpt: LazyCheckpoint, fqn: str) -> Any:
    """Decode the non-tensor item ``fqn`` of a rank file; tensors in it are copies, so the value
    stays intact after the file is closed and a later save overwrites it."""
    raw = ckpt.header.trees.get(OBJECTS_TREE)
    if not isinstance(raw, dict) or fqn not in raw:
        raise FormatError(f"{ckpt.path}: no object {fqn!r:.80}", region="trees")

    def tensor(section: str, name: str) -> torch.Tensor:
        return ckpt.get_tensor(name, section=section).clone()

    return decode_tree(raw[fqn], tensor, path=f"{ckpt.path}: object {fqn!r}")


def _file_shards(ckpt: LazyCheckpoint, index: DcpIndex, file: str) -> list[ShardRecord]:
    where = str(ckpt.path)
    info = ckpt.metadata.get("dcp")
    raw = info.get("shards") if isinstance(info, dict) else None
    if not isinstance(raw, list):
        raise FormatError(f"{where}: no shard table in the metadata", region="metadata")
    section = ckpt.header.section(SHARDS_SECTION)
    entries = section.by_name() if section is not None else {}
    out = []
    for shard in raw:
        if not isinstance(shard, dict) or not all(isinstance(shard.get(k), str) for k in ("fqn", "name")):
            raise FormatError(f"{where}: malformed shard record", region="metadata")
        fqn, name = shard["fqn"], shard["name"]
        tensor = index.tensors.get(fqn)
        entry = entries.get(section.aliases.get(name) or name) if section is not None else None
        if tensor is None or entry is None:
            raise FormatError(f"{where}: shard {name!r:.80} of {fqn!r:.80} is not in the index or the file",
                              region="metadata")
        offsets = parse_shape(shard.get("offsets"), where, "offsets")
        if parse_shape(shard.get("global_shape"), where, "global_shape") != tensor.shape or entry.dtype != tensor.dtype:
            raise FormatError(f"{where}: shard {name!r:.80} disagrees with the index on {fqn!r:.80}'s shape or dtype",
                              region="metadata")
        sizes = tuple(entry.shape)
        if len(offsets) != len(tensor.shape) or len(sizes) != len(tensor.shape) or any(
            o + s > g for o, s, g in zip(offsets, sizes, tensor.shape, strict=True)
        ):
            raise LayoutError(f"{where}: shard {name!r:.80} at {offsets} x {sizes} lies outside {tensor.shape}",
                              region="metadata")
        out.append(ShardRecord(fqn, offsets, sizes, StoredItem(Path(ckpt.path).name, name)))
    return out


def _volume(sizes: tuple[int, ...]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def _check_coverage(directory: Path, index: DcpIndex, shards: list[ShardRecord]) -> None:
    if len(shards) > MAX_SHARDS:
        raise FormatError(f"{directory}: {len(shards)} shards, more than {MAX_SHARDS}", region="index")
    by_fqn: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = defaultdict(list)
    for s in shards:
        by_fqn[s.fqn].append((s.offsets, s.sizes))
    for fqn, tensor in index.tensors.items():
        check_coverage(str(directory), fqn, tensor.shape, by_fqn.get(fqn, []))


def check_coverage(
    where: str, fqn: str, shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]
) -> None:
    """Shards of a tensor must lie inside it, not overlap, and cover it, or loads would read garbage.

    Raises:
        LayoutError: naming ``where`` and the tensor.
    """
    for offsets, sizes in boxes:
        if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
            o + s > g for o, s, g in zip(offsets, sizes, shape, strict=True)
        ):
            raise LayoutError(f"{where}: a shard of {fqn!r:.80} at {offsets} x {sizes} lies outside {shape}",
                              region="index")
    if sum(_volume(s) for _, s in boxes) != _volume(shape) or (not boxes and _volume(shape)):
        raise LayoutError(f"{where}: the shards of {fqn!r:.80} do not cover its shape {shape}", region="index")
    nonempty = [b for b in boxes if _volume(b[1])]
    for i, (a_off, a_size) in enumerate(nonempty):
        for b_off, b_size in nonempty[i + 1 :]:
            spans = zip(a_off, a_size, b_off, b_size, strict=True)
            if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in spans):
                raise LayoutError(f"{where}: two shards of {fqn!r:.80} overlap", region="index")


class MettaStorageReader(StorageReader):
    """Read a checkpoint written by :class:`MettaStorageWriter` on any number of ranks.

    Args:
        path: the checkpoint directory (``dcp.load(..., checkpoint_id=)`` may replace it).
        verify: check each shard's checksum when it is first read.

    Example:
        >>> dcp.load(state_dict, storage_reader=MettaStorageReader("ckpt/step_100"))
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        super().__init__()
        self.path = Path(path)
        self.verify = verify
        self.storage_data: dict[MetadataIndex, StoredItem] = {}
        self.load_id: str | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)
        self.storage_data = {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return "://" not in os.fspath(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        index, shards, objects = read_layout(self.path)
        state: dict[str, Any] = {}
        storage: dict[MetadataIndex, StoredItem] = {}
        for fqn, tensor in index.tensors.items():
            state[fqn] = TensorStorageMetadata(
                TensorProperties(dtype=dtype_from_tag(tensor.dtype)), torch.Size(tensor.shape), []
            )
        for s in shards:
            state[s.fqn].chunks.append(ChunkStorageMetadata(torch.Size(s.offsets), torch.Size(s.sizes)))
            storage[MetadataIndex(s.fqn, s.offsets)] = s.item
        for fqn, file in objects.items():
            state[fqn] = BytesStorageMetadata()
            storage[MetadataIndex(fqn)] = StoredItem(file, fqn)
        return Metadata(
            state_dict_metadata=state,
            planner_data=index.planner_data,
            storage_data=storage,
            storage_meta=StorageMeta(checkpoint_id=str(self.path), load_id=self.load_id),
        )

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = defaultdict(list)
        for item in plan.items:
            per_file[self._stored(item).file].append(item)
        for file, items in per_file.items():
            with open_rank_file(self.path, file, verify=self.verify) as ckpt:
                for item in items:
                    self._read_item(ckpt, item, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _stored(self, item: ReadItem) -> StoredItem:
        stored = self.storage_data.get(item.storage_index)
        if stored is None:
            raise FormatError(f"{self.path}: nothing stored for {item.storage_index.fqn!r}", region="index")
        return stored

    def _read_item(self, ckpt: LazyCheckpoint, item: ReadItem, planner: LoadPlanner) -> None:
        stored = self._stored(item)
        try:
            if item.type == LoadItemType.BYTE_IO:
                assign_object(planner, item, decode_object(ckpt, stored.name))
                return
            if self.verify:
                source = ckpt.get_tensor(stored.name, section=SHARDS_SECTION)
            else:  # only the pages of the requested slice are touched
                source = ckpt.get_slice(stored.name, section=SHARDS_SECTION)  # type: ignore[assignment]
            index = tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths, strict=True))
            piece = source[index]
        except MettaFormatError as e:
            e.args = (f"{ckpt.path}: {e}",)  # name the file; the error keeps its type
            raise
        target = planner.resolve_tensor(item).detach()
        check_tensor_target(target, tuple(piece.shape), item.dest_index.fqn)
        target.copy_(piece)
        planner.commit_tensor(item, target)
