"""``MettaStorageWriter``: each rank writes one container; the coordinator commits an index last.

Every save gets a fresh id chosen by the coordinator, and each rank writes
``__<rank>_<id>.mfmt`` atomically (temp + rename). The files the committed index names are left
alone until a new index has replaced it, so a rank dying mid-save leaves the previous
checkpoint loadable and the new one invisible. With ``durable``, each rank fsyncs its file and
the coordinator syncs the directory once, before the index can name the files, and once after
the index is in place: one directory sync per save, not one per rank.

With ``keep_previous`` (the default) the directory keeps two saves at rest: the committed one and
the one before it. A save overwrites the older one's file of its rank in place (renamed to a temp
name first, then to the new save's name once complete): writing into existing blocks costs a
fraction of allocating new ones and freeing old ones on a file system that discards freed blocks
online, where the next fsync waits for the discards. A file a reader holds (shared ``flock``) is
not overwritten; that rank writes a new file. Without ``keep_previous``, every save writes new
files and the previous save's are deleted after the commit, large ones in the background.

Each container holds the rank's shards in the section ``"shards"`` and its non-tensor items in
the object tree ``"objects"``; its metadata records, per shard, the tensor's name, global shape
and the shard's global offsets.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from mettaformat._atomic import TEMP_SUFFIX, fsync_dir, is_temp_file, remove_file
from mettaformat.constants import ZSTD_DEFAULT_LEVEL, Compression
from mettaformat.container.reader import LazyCheckpoint
from mettaformat.container.tree import encode_tree
from mettaformat.container.writer import write_container
from mettaformat.dcp.index import (
    INDEX_NAME,
    DcpIndex,
    FileRecord,
    TensorRecord,
    is_rank_file,
    rank_file_name,
    rank_of,
    read_index,
    write_index,
)
from mettaformat.dcp.planners import lookup_object
from mettaformat.dtypes import tag_from_dtype
from mettaformat.errors import MettaFormatError, WriteError

__all__ = ["SHARDS_SECTION", "OBJECTS_TREE", "MettaStorageWriter", "RankTarget", "StoredItem"]

SHARDS_SECTION: Final = "shards"
OBJECTS_TREE: Final = "objects"


@dataclass(frozen=True)
class StoredItem:
    """Where one shard or object lives: the rank file and, for shards, the tensor name in it."""

    file: str
    name: str


@dataclass(frozen=True)
class RankTarget:
    """What the coordinator tells one rank to write: its new file, and a superseded file of the
    same rank it may overwrite instead of creating a new one."""

    file: str
    reuse: str | None = None


class MettaStorageWriter(StorageWriter):
    """Write a distributed checkpoint as one container per rank, with no pickle anywhere.

    Args:
        path: the checkpoint directory (created if missing); ``dcp.save(..., checkpoint_id=)``
            may replace it.
        compression: ``"raw"`` (memory-mapped on load) or ``"zstd"``.
        level: zstd level.
        durable: fsync each file before it is renamed into place, and the directory before and
            after the index is committed, so a finished save survives a power loss.
        keep_previous: keep the previous save's rank files at rest beside the committed ones
            (two saves' worth of disk) and overwrite them in place in the save after next, which
            is much faster than new files on file systems that discard freed blocks. ``False``:
            one save at rest; every save writes new files and deletes the previous save's.

    Example:
        >>> dcp.save(state_dict, storage_writer=MettaStorageWriter("ckpt/step_100"))
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        compression: Compression = "raw",
        level: int = ZSTD_DEFAULT_LEVEL,
        durable: bool = False,
        keep_previous: bool = True,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.compression: Compression = compression
        self.level = level
        self.durable = durable
        self.keep_previous = keep_previous
        self.is_coordinator = False
        self.save_id = ""

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)
        self.save_id = ""

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return "://" not in os.fspath(checkpoint_id)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self.path.mkdir(parents=True, exist_ok=True)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # One id per save, chosen once and sent to every rank with its plan.
        save_id = uuid.uuid4().hex[:16]
        reusable = _reusable_files(self.path) if self.keep_previous else {}
        return [
            replace(p, storage_data=RankTarget(rank_file_name(rank, save_id), reusable.get(rank)))
            for rank, p in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        target = plan.storage_data
        if not isinstance(target, RankTarget) or not is_rank_file(target.file):
            raise WriteError(f"the global plan gave no rank file name ({target!r}); was prepare_global_plan run?")
        file_name = target.file
        tensors: dict[str, torch.Tensor] = {}
        objects: dict[str, Any] = {}
        shards: list[dict[str, Any]] = []
        results: list[WriteResult] = []
        for item in plan.items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                objects[fqn] = lookup_object(planner, item)
                results.append(WriteResult(item.index, 0, StoredItem(file_name, fqn)))
                continue
            tensor = planner.resolve_data(item)
            if not isinstance(tensor, torch.Tensor) or item.tensor_data is None:
                raise WriteError(f"tensor item {fqn!r} resolved to {type(tensor).__name__}")
            tensor = tensor.detach()
            name = fqn if fqn not in tensors else f"{fqn}@{','.join(map(str, item.tensor_data.chunk.offsets))}"
            while name in tensors:  # another tensor may already be called "fqn@offsets"
                name += "'"
            tensors[name] = tensor
            shards.append({
                "fqn": fqn,
                "name": name,
                "offsets": list(item.tensor_data.chunk.offsets),
                "global_shape": list(item.tensor_data.size),
            })
            results.append(WriteResult(item.index, tensor.numel() * tensor.element_size(), StoredItem(file_name, name)))
        try:
            # refuse what cannot be stored before any byte is written
            encode_tree(objects, lambda _tensor, name: (OBJECTS_TREE, name))
        except ValueError as e:
            raise WriteError(
                f"non-tensor state cannot be stored without pickle: {e}. Store plain values "
                "(numbers, strings, lists, dicts, tuples, tensors) instead"
            ) from None
        if results:
            write_container(
                self.path / file_name,
                {SHARDS_SECTION: tensors},
                metadata={"dcp": {"shards": shards}},
                trees={OBJECTS_TREE: objects} if objects else None,
                compression=self.compression,
                level=self.level,
                durable=self.durable,
                sync_dir=False,  # the coordinator syncs the directory once, before the commit
                reuse=self.path / target.reuse if target.reuse and is_rank_file(target.reuse) else None,
            )
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        files: dict[str, FileRecord] = {}
        for result in (r for rank in results for r in rank):
            name = result.storage_data.file
            if name not in files:
                files[name] = _record(self.path / name)
        tensors: dict[str, TensorRecord] = {}
        objects: list[str] = []
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                tensors[fqn] = TensorRecord(tag_from_dtype(md.properties.dtype, name=fqn), tuple(md.size))
            else:
                objects.append(fqn)
        save_id = next(iter(files)).split("_")[-1].removesuffix(".mfmt") if files else uuid.uuid4().hex[:16]
        planner_data = {k: tuple(v) for k, v in metadata.planner_data.items()} if metadata.planner_data else None
        previous = (_committed_files(self.path) or set()) if self.keep_previous else set()
        if self.durable:  # the rank files' names must be on disk before an index can name them
            fsync_dir(self.path)
        write_index(self.path, DcpIndex(save_id, files, tensors, tuple(objects), planner_data), durable=self.durable)
        _remove_uncommitted(self.path, set(files) | previous)


def _record(path: Path) -> FileRecord:
    with LazyCheckpoint(path, verify=False) as ckpt:
        return FileRecord(path.name, ckpt.file_size, ckpt.preamble.header_checksum)


def _committed_files(directory: Path) -> set[str] | None:
    """The rank files the index of ``directory`` names; None when there is no readable index."""
    try:
        return set(read_index(directory).files)
    except (MettaFormatError, OSError):
        return None


def _reusable_files(directory: Path) -> dict[int, str]:
    """Per rank, its largest rank file that the committed index does not name (the save before the
    committed one, or one that never committed). Nothing without a readable index: then no file
    is known to be superseded."""
    committed = _committed_files(directory)
    if committed is None:
        return {}
    best: dict[int, tuple[int, str]] = {}
    for entry in os.scandir(directory):
        rank = rank_of(entry.name)
        if rank is None or entry.name in committed or not entry.is_file(follow_symlinks=False):
            continue
        size = entry.stat(follow_symlinks=False).st_size
        if rank not in best or size > best[rank][0]:
            best[rank] = (size, entry.name)
    return {rank: name for rank, (_, name) in best.items()}


def _remove_uncommitted(directory: Path, keep: set[str]) -> None:
    """After the commit, files of other saves go: rank files neither kept nor committed (older
    saves, saves that never committed) and temp files a killed rank left behind."""
    for entry in os.scandir(directory):
        name = entry.name
        if name.startswith(".") and is_temp_file(name):  # .<target>.<random>.mfmt-tmp
            name = name[1:].removesuffix(TEMP_SUFFIX).rpartition(".")[0]
        if (is_rank_file(name) and name not in keep) or (name == INDEX_NAME and entry.name != INDEX_NAME):
            remove_file(entry.path)
