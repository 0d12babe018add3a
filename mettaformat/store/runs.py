"""Which run each checkpoint belongs to, and which files are copies of one checkpoint.

Retention rules count checkpoints *per run*: ``LatestN(2)`` over a folder holding two runs keeps
two of each, never two in total. And a checkpoint converted to another format (``model_0050.pt``
beside ``model_0050.mfmt``) is still one checkpoint: its copies are kept or deleted together.

- A run is named by the checkpoint's metadata (``run``, else a ``run_name`` that is not a file
  name, with Metta's ``:vNN`` version suffix removed), within its directory. Without one, the
  file-name stem with its trailing number removed names it (``ppo_a_0050`` -> ``ppo_a_``), again
  within the directory.
- Copies ("twins") are files of one directory whose names differ only in the suffix.

When in doubt this splits rather than merges: a smaller group can only make a rule keep more.
Framework-neutral (no torch).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mettaformat.store.record import PolicyRecord

__all__ = ["CheckpointCopies", "RunGroup", "group_by_run", "run_label"]

_VERSION_SUFFIX: Final = re.compile(r":v\d+$")
_FILE_NAME: Final = re.compile(r"\.[A-Za-z][A-Za-z0-9_-]*$")
_TRAILING_NUMBER: Final = re.compile(r"\d+$")


@dataclass(frozen=True)
class CheckpointCopies:
    """One checkpoint: its files (the same stem in one directory), the representative first.

    The representative is what retention rules see: the container copy when there is one (its
    header is what listing reads), else the newest file.
    """

    files: tuple[PolicyRecord, ...]

    @property
    def representative(self) -> PolicyRecord:
        return self.files[0]


@dataclass(frozen=True)
class RunGroup:
    """The checkpoints of one run in one directory."""

    directory: Path
    run: str
    checkpoints: tuple[CheckpointCopies, ...]


def _metadata_run(record: PolicyRecord) -> str | None:
    run = record.metadata.get("run")
    if isinstance(run, str) and run.strip():
        return run
    name = record.metadata.get("run_name")
    if isinstance(name, str) and name.strip():
        name = _VERSION_SUFFIX.sub("", name)
        # Older exports fill run_name with the file name (model_0050.pt), which names no run.
        if name and not _FILE_NAME.search(name):
            return name
    return None


def run_label(record: PolicyRecord) -> str:
    """The run of one file: from its metadata, else its name pattern (``model_`` for model_0050.pt)."""
    from_metadata = _metadata_run(record)
    if from_metadata is not None:
        return from_metadata
    stem = _TRAILING_NUMBER.sub("", record.path.stem)
    return f"{stem}*" if stem != record.path.stem else record.path.stem


def _copies(files: list[PolicyRecord]) -> CheckpointCopies:
    ordered = sorted(files, key=lambda r: (r.format != "mettaformat", -r.mtime_ns, r.name))
    return CheckpointCopies(tuple(ordered))


def group_by_run(records: Sequence[PolicyRecord]) -> list[RunGroup]:
    """Group ``records`` into runs of checkpoints (copies joined), in a deterministic order."""
    by_stem: dict[tuple[Path, str], list[PolicyRecord]] = {}
    for r in records:
        by_stem.setdefault((r.path.parent, r.path.stem), []).append(r)
    runs: dict[tuple[Path, str], list[CheckpointCopies]] = {}
    for (directory, _), files in sorted(by_stem.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        copies = _copies(files)
        # A copy may lack the run metadata its original has; the first copy that names one wins.
        named = [run for run in (_metadata_run(f) for f in copies.files) if run is not None]
        run = named[0] if named else run_label(copies.representative)
        runs.setdefault((directory, run), []).append(copies)
    return [RunGroup(directory, run, tuple(cps)) for (directory, run), cps in runs.items()]
