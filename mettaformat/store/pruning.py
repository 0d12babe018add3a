"""Carrying out ``PolicyStore.prune``: plan, confirm, make kept deltas standalone, delete, report.

The plan is made from a full listing. In a folder, a kept delta checkpoint whose base is doomed
can be rewritten standalone first (``materialize_dependants``); objects in a bucket are not
rewritten in place, so there their bases are always kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mettaformat.errors import StoreError
from mettaformat.store.catalog import ScanResult
from mettaformat.store.deltas import dependants, make_standalone
from mettaformat.store.maintenance import PruneReport, SkippedFile, clean_temp_files, delete_records, plan_prune
from mettaformat.store.record import PolicyRecord
from mettaformat.store.remote_store import delete_objects, is_object_storage
from mettaformat.store.retention import RetentionPolicy
from mettaformat.store.selectors import latest_first
from mettaformat.store.uri import local_path, split_scheme

__all__ = ["run_prune"]


def run_prune(
    scan: ScanResult,
    target: str,
    policy: RetentionPolicy,
    *,
    dry_run: bool,
    temp_grace_s: float,
    allow_delete_all: bool,
    confirm: Callable[[PruneReport], bool] | None,
    materialize_dependants: bool,
    use_index: bool,
    forget: Callable[[list[PolicyRecord]], None],
) -> PruneReport:
    """Prune the checkpoints of ``scan`` (the listing of ``target``) to what ``policy`` keeps.

    ``forget`` is called with the records whose files were deleted or rewritten. The arguments
    are those of :meth:`mettaformat.store.store.PolicyStore.prune`.
    """
    local = not is_object_storage(target)  # objects in a bucket are not rewritten in place: their bases stay
    plan = plan_prune(scan.records, policy, keep_bases=not (materialize_dependants and local))
    to_materialize = dependants(plan.kept, plan.doomed) if materialize_dependants and local else []
    if scan.records and not plan.kept and not allow_delete_all:
        raise StoreError(
            f"{policy!r} keeps none of the {len(scan.records)} checkpoints at {target}; "
            "pass allow_delete_all=True to delete them all"
        )
    skipped = [SkippedFile(e.path, f"unreadable: {e.detail}") for e in scan.unreadable]
    directories = sorted(_directories(target, scan))

    def report(deleted: list[PolicyRecord], temps: list[Path], dry: bool, made: list[Path]) -> PruneReport:
        return PruneReport(
            policy=repr(policy),
            dry_run=dry,
            materialized=tuple(made),
            kept=tuple(plan.kept),
            deleted=tuple(deleted),
            kept_by=plan.kept_by,
            skipped=tuple(skipped),
            temp_files_removed=tuple(temps),
            runs=plan.runs,
        )

    def temp_files(dry: bool) -> list[Path]:
        return [p for d in directories for p in clean_temp_files(d, grace_s=temp_grace_s, dry_run=dry)]

    if dry_run or confirm is not None:
        preview = report(plan.doomed, temp_files(True), True, to_materialize)
        if dry_run or (confirm is not None and not confirm(preview)):
            return preview
    if not local:
        deleted, not_deleted_remote = delete_objects(plan.doomed, use_index=use_index)
        skipped.extend(SkippedFile(p, why) for p, why in not_deleted_remote)
        forget(deleted)
        return report(deleted, temp_files(False), False, [])
    made, rescued, failed = make_standalone(to_materialize, plan.doomed)
    skipped.extend(SkippedFile(p, why) for p, why in failed)
    if rescued:  # bases a file that stays a delta still needs
        plan.kept[:] = latest_first([*plan.kept, *(r for r in plan.doomed if r.path in rescued)])
        plan.kept_by.update({p: ("base of a kept delta checkpoint",) for p in rescued})
        plan.doomed[:] = [r for r in plan.doomed if r.path not in rescued]
    deleted, not_deleted = delete_records(plan.doomed)
    skipped.extend(not_deleted)
    forget([*deleted, *(r for r in plan.kept if r.path in set(made))])
    return report(deleted, temp_files(False), False, made)


def _directories(target: str, scan: ScanResult) -> set[Path]:
    """The folders whose crash-leftover temp files a prune of ``target`` removes."""
    scheme, _ = split_scheme(target)
    if is_object_storage(target):
        return set()  # temp keys: uploads to S3/GCS have none; others are moved into place at once
    dirs = {r.path.parent for r in scan.records}
    if scheme in (None, "file"):
        path = local_path(target)
        if path.is_dir():
            dirs.add(Path(os.path.abspath(path)))
    return dirs
