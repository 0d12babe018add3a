"""What ``inspect`` and ``validate`` say about a distributed checkpoint directory.

Both read torch's layout through the safe importer only; nothing in a ``.metadata`` runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mettaformat.dcp.consolidate import directory_bytes, read_dcp
from mettaformat.dcp.index import INDEX_NAME
from mettaformat.dcp.reader import open_rank_file, read_layout
from mettaformat.dtypes import tag_from_dtype
from mettaformat.errors import MettaFormatError, WriteError

if TYPE_CHECKING:
    from mettaformat.validate import ValidationReport

__all__ = ["describe_dcp", "validate_dcp"]


def _tag(dtype: Any) -> str:
    try:
        return tag_from_dtype(dtype)
    except WriteError:
        return str(dtype).removeprefix("torch.")


def describe_dcp(path: str, kind: str) -> dict[str, Any]:
    """The fields ``mettaformat inspect`` shows: global tensors, shard counts, non-tensor items."""
    directory = Path(path)
    info: dict[str, Any] = {
        "path": path, "format": kind, "version": None, "shape": "distributed",
        "file_bytes": directory_bytes(directory), "checksum": None, "sections": [], "trees": [],
        "model_type": None, "name": None, "class_paths": [],
    }
    if kind == "dcp":
        index, shards, objects = read_layout(directory)
        counts: dict[str, int] = {}
        for s in shards:
            counts[s.fqn] = counts.get(s.fqn, 0) + 1
        # the checkpoint is what the index names; an earlier save kept for reuse is reported apart
        committed = (directory / INDEX_NAME).stat().st_size + sum(f.size for f in index.files.values())
        kept = info["file_bytes"] - committed
        info["file_bytes"] = committed
        info["version"] = f"save {index.save_id}, {len(index.files)} rank files" + (
            f"; {kept:,} more bytes in the directory (an earlier save kept to be overwritten)"
            if kept > 0 else "")
        info["tensors"] = [
            {"section": "model", "name": fqn, "dtype": t.dtype, "shape": list(t.shape),
             "bytes": _bytes(t.shape, t.dtype), "alias_of": None, "shards": counts.get(fqn, 0)}
            for fqn, t in index.tensors.items()
        ]
        info["metadata"] = {"objects": sorted(objects)}
        return info
    ckpt = read_dcp(directory)  # torch's layout: consolidated through the safe importer
    info["tensors"] = [
        {"section": "model", "name": k, "dtype": _tag(t.dtype), "shape": list(t.shape),
         "bytes": t.numel() * t.element_size(), "alias_of": None}
        for k, t in ckpt.tensors.items()
    ]
    info["metadata"] = {"objects": sorted(ckpt.training.trainer_state) if ckpt.training else []}
    info["class_paths"] = ckpt.provenance.get("class_paths", [])
    return info


def _bytes(shape: tuple[int, ...], tag: str) -> int:
    from mettaformat.dtypes import itemsize

    n = itemsize(tag)
    for s in shape:
        n *= s
    return n


def validate_dcp(path: str | os.PathLike[str], kind: str, deep: bool, report: ValidationReport) -> None:
    """Check the index, every rank file's structure and checksums, and every object tree."""
    from mettaformat.validate import Problem, unsafe_globals

    report.shape = "distributed"
    directory = Path(path)
    if kind == "torch-dcp":
        ckpt = read_dcp(directory)
        report.tensors_checked = len(ckpt.tensors)
        report.unsafe_globals = unsafe_globals(list(ckpt.provenance.get("class_paths", [])))
        for g in report.unsafe_globals:
            report.problems.append(Problem(".metadata", f"names unsafe global {g} (recorded, never executed)"))
        return
    index, _, _ = read_layout(directory)
    for name in index.files:
        with open_rank_file(directory, name) as rank_file:
            try:
                rank_file.verify_structure()
                for s in rank_file.header.sections:
                    for t in s.tensors:
                        rank_file.read_entry(s, t)
                        report.tensors_checked += 1
                for tree in rank_file.tree_names:
                    rank_file.tree(tree)
            except MettaFormatError as e:
                report.problems.append(Problem(f"{name}: {e.region or 'file'}", e.message))
    if deep:
        read_dcp(directory)  # assembles every tensor from its shards
