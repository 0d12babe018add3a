"""Pruning and crash cleanup: the only code in the store that deletes files.

Two rules keep deletion safe:

- only listed checkpoints are ever deleted, and only if the file still has the signature
  (mtime, size, inode) it had when it was listed: a checkpoint re-saved under the same name in
  the meantime is kept;
- files being written are temp files (``*.mfmt-tmp``), which are never listed; a temp file is
  removed only once it is older than a grace period, as a leftover of a crashed writer
  (threat model WR5).
"""

from __future__ import annotations

import math
import os
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from mettaformat._atomic import TEMP_SUFFIX
from mettaformat.store.record import PolicyRecord, stat_signature
from mettaformat.store.retention import RetentionPolicy
from mettaformat.store.runs import group_by_run
from mettaformat.store.selectors import latest_first

__all__ = [
    "DEFAULT_TEMP_GRACE_S",
    "PrunePlan",
    "PruneReport",
    "SkippedFile",
    "clean_temp_files",
    "delete_records",
    "plan_prune",
]

#: A temp file younger than this may belong to a save in progress (in this or another process).
DEFAULT_TEMP_GRACE_S: Final = 3600.0


@dataclass(frozen=True)
class SkippedFile:
    """A file prune left alone, and why."""

    path: Path
    reason: str


@dataclass(frozen=True, kw_only=True)
class PruneReport:
    """What ``PolicyStore.prune`` kept and deleted (or would have, in a dry run).

    Attributes:
        policy: the retention policy, as text.
        dry_run: nothing was deleted.
        kept: kept checkpoints, newest first.
        deleted: deleted checkpoints (would-be deleted in a dry run), newest first.
        kept_by: for each kept path, the policies that kept it.
        skipped: files left alone: unreadable ones, and ones that changed since listing.
        temp_files_removed: crash leftovers removed (or that would be).
        runs: for each checkpoint, the run whose retention decided its fate
            (see :mod:`mettaformat.store.runs`).
        materialized: kept delta checkpoints rewritten as standalone files (that would be, in a dry
            run) so that their bases could be deleted (``materialize_dependants``).
    """

    policy: str
    dry_run: bool
    kept: tuple[PolicyRecord, ...]
    deleted: tuple[PolicyRecord, ...]
    kept_by: Mapping[Path, tuple[str, ...]] = field(default_factory=dict)
    skipped: tuple[SkippedFile, ...] = ()
    temp_files_removed: tuple[Path, ...] = ()
    runs: Mapping[Path, str] = field(default_factory=dict)
    materialized: tuple[Path, ...] = ()

    def __str__(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        lines = [f"{self.policy}: kept {len(self.kept)}, {verb} {len(self.deleted)} ({self.bytes_freed} bytes)"]
        lines += [f"  keep {r.path} ({', '.join(self.kept_by.get(r.path, ()))})" for r in self.kept]
        lines += [f"  {'would make' if self.dry_run else 'made'} standalone {p}" for p in self.materialized]
        lines += [f"  {verb} {r.path}" for r in self.deleted]
        temp_verb = "would remove" if self.dry_run else "removed"
        lines += [f"  {temp_verb} temp file {p}" for p in self.temp_files_removed]
        lines += [f"  left alone {s.path}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)

    @property
    def bytes_freed(self) -> int:
        """Bytes of the deleted checkpoints (that would be freed, in a dry run)."""
        return sum(r.size for r in self.deleted)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (used by ``mettaformat prune --json``)."""
        return {
            "policy": self.policy,
            "dry_run": self.dry_run,
            "kept": [
                {
                    "path": str(r.path),
                    "run": self.runs.get(r.path),
                    "epoch": r.epoch,
                    "kept_by": list(self.kept_by.get(r.path, ())),
                }
                for r in self.kept
            ],
            "deleted": [
                {"path": str(r.path), "run": self.runs.get(r.path), "epoch": r.epoch, "size": r.size}
                for r in self.deleted
            ],
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in self.skipped],
            "temp_files_removed": [str(p) for p in self.temp_files_removed],
            "materialized": [str(p) for p in self.materialized],
            "bytes_freed": self.bytes_freed,
        }


@dataclass(frozen=True)
class PrunePlan:
    """What a prune keeps and deletes, newest first, and why."""

    kept: list[PolicyRecord]
    doomed: list[PolicyRecord]
    kept_by: dict[Path, tuple[str, ...]]
    runs: dict[Path, str]


def plan_prune(records: Sequence[PolicyRecord], policy: RetentionPolicy, *, keep_bases: bool = True) -> PrunePlan:
    """Apply ``policy`` to each run separately; copies of one checkpoint share its fate. With
    ``keep_bases`` every base a kept delta checkpoint needs is kept too (otherwise the caller makes
    those deltas standalone first).

    See :mod:`mettaformat.store.runs` for how runs and copies are recognised.
    """
    reasons: dict[Path, list[str]] = {}
    kept_paths: set[Path] = set()
    runs: dict[Path, str] = {}
    for group in group_by_run(records):
        copies = {c.representative.path: c.files for c in group.checkpoints}
        representatives = [c.representative for c in group.checkpoints]
        for files in copies.values():
            runs.update((f.path, group.run) for f in files)
        for leaf in policy.leaves():
            for path in leaf.keep(representatives):
                for f in copies[path]:
                    reasons.setdefault(f.path, []).append(repr(leaf))
        # The union, by definition; leaves() only explains it.
        kept_paths.update(f.path for path in policy.keep(representatives) for f in copies[path])
    if keep_bases:
        _keep_bases(records, kept_paths, reasons)
    ordered = latest_first(records)
    return PrunePlan(
        kept=[r for r in ordered if r.path in kept_paths],
        doomed=[r for r in ordered if r.path not in kept_paths],
        kept_by={p: tuple(v) for p, v in reasons.items() if p in kept_paths},
        runs=runs,
    )


def _keep_bases(records: Sequence[PolicyRecord], kept_paths: set[Path], reasons: dict[Path, list[str]]) -> None:
    """Keep every base a kept delta checkpoint is rebuilt from (bases of bases too): deleting one would
    make the kept file unreadable."""
    from mettaformat.container.delta import declared_base

    by_path = {os.path.realpath(r.path): r.path for r in records}
    pending = [p for p in kept_paths if p.suffix == ".mfmt"]
    while pending:
        base = declared_base(pending.pop())
        listed = by_path.get(os.path.realpath(base)) if base is not None else None
        if listed is not None and listed not in kept_paths:
            kept_paths.add(listed)
            reasons.setdefault(listed, []).append("base of a kept delta checkpoint")
            pending.append(listed)


def delete_records(records: Sequence[PolicyRecord]) -> tuple[list[PolicyRecord], list[SkippedFile]]:
    """Delete each record's file if it is still the version that was listed.

    Returns:
        (deleted, skipped). A file already gone counts as deleted.
    """
    deleted: list[PolicyRecord] = []
    skipped: list[SkippedFile] = []
    for record in records:
        try:
            st = os.lstat(record.path)
        except FileNotFoundError:
            deleted.append(record)
            continue
        except OSError as e:
            skipped.append(SkippedFile(record.path, f"cannot stat: {e.strerror}"))
            continue
        if not stat.S_ISREG(st.st_mode) or stat_signature(st) != record.signature:
            # Re-saved (or swapped) since it was listed: the retention decision was about
            # another version of this file.
            skipped.append(SkippedFile(record.path, "changed since it was listed"))
            continue
        try:
            os.unlink(record.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            skipped.append(SkippedFile(record.path, f"cannot delete: {e.strerror}"))
            continue
        deleted.append(record)
    return deleted, skipped


def clean_temp_files(
    directory: Path, *, grace_s: float = DEFAULT_TEMP_GRACE_S, dry_run: bool = False, now: float | None = None
) -> list[Path]:
    """Remove ``*.mfmt-tmp`` files older than ``grace_s`` seconds from ``directory``.

    Younger temp files may be saves in progress and are left alone. Symlinks and anything but
    regular files are never touched. Not recursive.

    Args:
        directory: where to look.
        grace_s: minimum age (by mtime) of a temp file before it counts as a crash leftover.
        dry_run: only report.
        now: the current time (seconds since the epoch); for tests.

    Returns:
        The temp files removed (or that would be, in a dry run).

    Raises:
        ValueError: ``grace_s`` is negative or not finite.
    """
    if not isinstance(grace_s, (int, float)) or not math.isfinite(grace_s) or grace_s < 0:
        raise ValueError(f"grace_s must be a finite number >= 0, got {grace_s!r}")
    current = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.endswith(TEMP_SUFFIX) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            age = current - entry.stat(follow_symlinks=False).st_mtime
            if age <= grace_s:
                continue
            if not dry_run:
                os.unlink(entry.path)
        except OSError:
            continue  # finished (renamed) or removed by its writer meanwhile
        removed.append(Path(entry.path))
    return sorted(removed)
