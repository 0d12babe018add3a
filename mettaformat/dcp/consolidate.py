"""A distributed checkpoint directory as one :class:`~mettaformat.Checkpoint`, and back.

Consolidation assembles every tensor from its shards (whatever the number of ranks that
saved it) and keeps the non-tensor items as ``training.trainer_state``, keyed by their DCP
names. Two layouts are read: ours (:class:`~mettaformat.dcp.MettaStorageWriter`) and torch's
default ``FileSystemWriter`` one, interpreted by the safe legacy importer; ``torch.load`` is
never called. The way back writes our layout from one process; any rank count loads it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from mettaformat.checkpoint import Checkpoint, TrainingState
from mettaformat.constants import Compression
from mettaformat.dcp.index import INDEX_NAME, TORCH_METADATA_NAME
from mettaformat.dcp.reader import ShardRecord, check_coverage, decode_object, open_rank_file, read_layout
from mettaformat.dcp.torch_layout import read_torch_item, read_torch_layout
from mettaformat.dcp.writer import SHARDS_SECTION, MettaStorageWriter
from mettaformat.dtypes import dtype_from_tag
from mettaformat.errors import FormatError, MettaFormatError, WriteError

__all__ = ["DcpKind", "directory_bytes", "read_dcp", "read_objects", "sniff_dcp", "write_dcp"]

DcpKind = Literal["dcp", "torch-dcp"]


def sniff_dcp(path: str | os.PathLike[str]) -> DcpKind | None:
    """``"dcp"`` for our layout, ``"torch-dcp"`` for torch's, None if ``path`` is neither."""
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / INDEX_NAME).is_file():
        return "dcp"
    if (p / TORCH_METADATA_NAME).is_file():
        return "torch-dcp"
    return None


def directory_bytes(path: str | os.PathLike[str]) -> int:
    """Total size of the files directly in ``path`` (a file's own size for a file)."""
    p = Path(path)
    if not p.is_dir():
        return p.stat().st_size
    return sum(e.stat().st_size for e in os.scandir(p) if e.is_file())


def read_dcp(path: str | os.PathLike[str], *, verify: bool = True) -> Checkpoint:
    """Consolidate the distributed checkpoint at ``path`` into one in-memory checkpoint.

    Raises:
        FormatError, IntegrityError: not a distributed checkpoint, or a damaged one.
        LegacyImportError: torch's layout with a malformed or hostile ``.metadata``.
    """
    directory = Path(path)
    kind = sniff_dcp(directory)
    if kind is None:
        raise FormatError(f"{directory} holds neither {INDEX_NAME} nor torch's {TORCH_METADATA_NAME}", region="file")
    if kind == "dcp":
        tensors, objects, planner_data = _read_ours(directory, verify)
        provenance: dict[str, Any] = {"source_format": "dcp", "shape": "distributed"}
    else:
        tensors, objects, planner_data, seen = _read_torch(directory)
        provenance = {"source_format": "torch-dcp", "shape": "distributed",
                      "class_paths": sorted(f"{m}.{n}" for m, n in seen)}
    if planner_data:
        provenance["dcp_nesting"] = {k: list(v) for k, v in planner_data.items()}
    return Checkpoint(
        tensors=tensors,
        training=TrainingState(trainer_state=objects) if objects else None,
        versions={"checkpoint_format": None},
        provenance=provenance,
    )


def _read_ours(directory: Path, verify: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    index, shards, _ = read_layout(directory)
    tensors = {fqn: torch.empty(t.shape, dtype=dtype_from_tag(t.dtype)) for fqn, t in index.tensors.items()}
    by_file: dict[str, list[ShardRecord]] = {}
    for s in shards:
        by_file.setdefault(s.item.file, []).append(s)
    for file, mine in by_file.items():
        with open_rank_file(directory, file, verify=verify) as ckpt:
            for s in mine:
                region = tuple(slice(o, o + n) for o, n in zip(s.offsets, s.sizes, strict=True))
                tensors[s.fqn][region].copy_(ckpt.get_tensor(s.item.name, section=SHARDS_SECTION))
    objects, planner_data = read_objects(directory)
    return tensors, objects, planner_data


def read_objects(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Any]:
    """Every non-tensor item of one of our directories, decoded, with DCP's flattening map.

    Raises:
        FormatError, IntegrityError: as for :class:`~mettaformat.dcp.MettaStorageReader`.
    """
    directory = Path(path)
    index, _, owners = read_layout(directory)
    values: dict[str, Any] = {}
    for file in set(owners.values()):
        with open_rank_file(directory, file) as ckpt:
            for fqn in (f for f, owner in owners.items() if owner == file):
                values[fqn] = decode_object(ckpt, fqn)
    return values, index.planner_data


def _read_torch(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any, set[tuple[str, str]]]:
    layout = read_torch_layout(directory)
    tensors: dict[str, torch.Tensor] = {}
    for fqn, (dtype, shape, chunks) in layout.tensors.items():
        check_coverage(str(directory), fqn, shape, [(o, s) for o, s, _ in chunks])
        full = torch.empty(shape, dtype=dtype)
        for offsets, sizes, stored in chunks:
            piece, _ = read_torch_item(directory, stored)
            if not isinstance(piece, torch.Tensor) or tuple(piece.shape) != sizes or piece.dtype != dtype:
                raise FormatError(f"{directory / stored.file}: the item of {fqn!r:.80} at {offsets} is not a "
                                  f"{dtype} tensor of shape {sizes}", region=stored.file, offset=stored.offset)
            full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))].copy_(piece)
        tensors[fqn] = full
    objects: dict[str, Any] = {}
    seen = set(layout.globals_seen)
    for fqn, stored in layout.objects.items():
        objects[fqn], named = read_torch_item(directory, stored)
        seen |= named
    return tensors, objects, layout.planner_data, seen


def write_dcp(
    ckpt: Checkpoint, dst: str | os.PathLike[str], *, compression: Compression = "raw", strict: bool = False
) -> tuple[list[str], list[str]]:
    """Write ``ckpt`` as a distributed checkpoint directory (our layout) from this one process.

    Weights keep their names; training state goes under ``optimizer``, ``scheduler`` and
    ``rng``; the items of ``trainer_state`` become top-level items (so a consolidated DCP
    checkpoint comes back with its original names).

    Returns:
        ``(not_carried, notes)`` for a conversion report.

    Raises:
        WriteError: ``strict`` and something cannot be carried; state that cannot be stored
            without pickle; an I/O error.
    """
    state: dict[str, Any] = {k: v for k, v in ckpt.tensors.items()}
    not_carried = [f"metadata key {k!r}" for k in ckpt.metadata]
    not_carried += [f"agent attribute {k!r}" for k in ckpt.agent_attributes]
    if ckpt.legacy_graph is not None or ckpt.legacy_tensors:
        not_carried.append("the legacy object graph")
    if strict and not_carried:
        raise WriteError(f"{dst}: a distributed checkpoint cannot carry {', '.join(not_carried)}")
    if ckpt.training is not None:
        t = ckpt.training
        for name, value in (("optimizer", t.optimizer), ("scheduler", t.scheduler), ("rng", t.rng or None)):
            if value is not None:
                state[name] = value
        for k, v in t.trainer_state.items():
            if k in state:
                raise WriteError(f"trainer_state item {k!r} has the name of a tensor or training tree")
            state[k] = v
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_saver import save

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that no process group is initialised
            save(state, storage_writer=MettaStorageWriter(dst, compression=compression), no_dist=True)
    except CheckpointException as e:
        cause = next(iter(e.failures.values()), (e,))[0]  # (exception, traceback summary)
        if isinstance(cause, MettaFormatError):
            raise cause from None
        raise WriteError(f"{dst}: {cause}") from None
    return not_carried, []
