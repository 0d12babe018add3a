"""Which checkpoint a delta save stands on.

Every delta of a run is written against the run's latest full checkpoint, so a chain is one base
deep and deleting a delta never breaks another; after ``full_every - 1`` deltas the next save is
full again, which bounds how many files a base carries and how much a damaged base can cost.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, cast

import torch

from mettaformat.container.delta import declared_base
from mettaformat.dtypes import tag_from_dtype
from mettaformat.errors import MettaFormatError, StoreError
from mettaformat.store.record import PolicyRecord
from mettaformat.store.runs import run_label
from mettaformat.store.selectors import latest_first

__all__ = ["DeltaMode", "choose_base", "check_delta_options"]

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
