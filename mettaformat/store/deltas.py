"""Which checkpoint a delta save stands on, and which kept deltas a prune makes standalone.

Every delta of a run is written against the run's latest full checkpoint, so a chain is one base
deep and deleting a delta never breaks another; after ``full_every - 1`` deltas the next save is
full again, which bounds how many files a base carries and how much a damaged base can cost.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, cast

import torch

from mettaformat._atomic import TEMP_SUFFIX
from mettaformat.container.delta import declared_base, declared_chain
from mettaformat.dtypes import tag_from_dtype
from mettaformat.errors import MettaFormatError, StoreError
from mettaformat.store.record import PolicyRecord
from mettaformat.store.runs import run_label
from mettaformat.store.selectors import latest_first

__all__ = ["DeltaMode", "check_delta_options", "choose_base", "dependants", "make_standalone"]

DeltaMode = bool | Literal["auto"]


def check_delta_options(delta: Any, full_every: Any) -> None:
    if delta not in (False, True, "auto") or type(delta) not in (bool, str):
        raise StoreError(f"delta must be False, True or 'auto', not {delta!r}")
    if type(full_every) is not int or full_every < 1:
        raise StoreError(f"full_every must be a positive integer, not {full_every!r}")


def choose_base(records: Sequence[PolicyRecord], target: Path, metadata: Mapping[str, Any],
                tensors: Mapping[str, torch.Tensor], delta: DeltaMode, full_every: int) -> Path | None:
    """The base for saving ``target`` as a delta, or None when it should be a full checkpoint: the run has
    no full checkpoint in ``target``'s folder yet, ``full_every - 1`` deltas already stand on the latest,
    or (``"auto"``) fewer than half of the tensor bytes have a same-named, same-shaped tensor there."""
    if not delta:
        return None
    label = run_label(cast(PolicyRecord, SimpleNamespace(metadata=metadata, path=target)))
    here = os.path.realpath(target.parent)
    deltas_since = 0
    for record in latest_first(records):
        if (record.format != "mettaformat" or os.path.realpath(record.path.parent) != here
                or record.path.name == target.name or run_label(record) != label):
            continue
        if declared_base(record.path) is not None:
            deltas_since += 1
            continue
        if deltas_since + 1 >= full_every:
            return None
        if delta == "auto" and not _mostly_shared(record.path, tensors):
            return None
        return record.path
    return None


def _mostly_shared(base: Path, tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether at least half of the bytes of ``tensors`` have a tensor of the same name, dtype and shape in ``base``."""
    from mettaformat.container.reader import LazyCheckpoint

    try:
        with LazyCheckpoint(base, verify=False) as ckpt:
            section = ckpt.header.section("model")
            entries = {e.name: e for e in section.tensors} if section is not None else {}
            aliases = dict(section.aliases) if section is not None else {}
    except (OSError, MettaFormatError):
        return False
    total = shared = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        total += size
        entry = entries.get(aliases.get(name, name))
        if entry is not None and entry.shape == tuple(t.shape) and entry.dtype == tag_from_dtype(t.dtype):
            shared += size
    return total > 0 and 2 * shared >= total


def dependants(kept: Sequence[PolicyRecord], doomed: Sequence[PolicyRecord]) -> list[Path]:
    """The kept delta files whose chain of bases reaches a doomed file: they must become standalone
    before it is deleted. Each comes before its own bases (materializing a base changes its identity,
    which a delta on it still being rebuilt from would no longer accept)."""
    gone = {os.path.realpath(r.path) for r in doomed}
    chains = {r.path: declared_chain(r.path) for r in kept if r.format == "mettaformat"}
    needed = [p for p, c in chains.items() if any(os.path.realpath(b) in gone for b in c)]
    return sorted(needed, key=lambda p: -len(chains[p]))


def make_standalone(paths: Sequence[Path], doomed: Sequence[PolicyRecord]
                    ) -> tuple[list[Path], set[Path], list[tuple[Path, str]]]:
    """Rewrite each of ``paths`` (in order) as a standalone checkpoint in place, atomically.

    Returns:
        (made standalone, doomed paths that must now be kept because a file that needs them could not
        be made standalone, (path, why) for each such file).
    """
    from mettaformat.container.materialize import materialize

    made: list[Path] = []
    rescued: set[Path] = set()
    failed: list[tuple[Path, str]] = []
    by_real = {os.path.realpath(r.path): r.path for r in doomed}
    for path in paths:
        temp = path.with_name(f".{path.name}.standalone{TEMP_SUFFIX}")
        try:
            materialize(path, temp)
            os.replace(temp, path)
        except (MettaFormatError, OSError) as e:
            with contextlib.suppress(OSError):
                temp.unlink()
            chain = [by_real[r] for b in declared_chain(path) if (r := os.path.realpath(b)) in by_real]
            rescued.update(chain)
            failed.append((path, f"left as a delta, its bases are kept: it cannot be made standalone ({e})"))
            continue
        made.append(path)
    return made, rescued, failed
