"""The object-storage side of ``PolicyStore``: listing through the prefix index, saving, deleting.

A prefix's index may stand in for a listing while it is recent; whatever is then chosen from it
is checked to still exist before it is used. Objects are uploaded whole and become visible at
once, so a save needs no temp file, and the index is updated after each save and deletion.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from mettaformat.agent import MettaAgent
from mettaformat.checkpoint_io import write_checkpoint
from mettaformat.constants import Compression
from mettaformat.errors import StoreError
from mettaformat.remote.uri import fsspec_knows, join_uri
from mettaformat.store.catalog import ScanResult
from mettaformat.store.record import PolicyRecord
from mettaformat.store.saving import STORE_SUFFIX, checkpoint_for, default_name
from mettaformat.store.selectors import Exclusion
from mettaformat.store.uri import check_file_name, registered_schemes, split_scheme

__all__ = ["delete_objects", "is_object_storage", "save_remote", "scan_object_storage", "stale_selection"]

#: Selections larger than this are checked by a full listing rather than one request per object.
_MAX_CHECKED: Final = 32


def is_object_storage(uri: str) -> bool:
    """A URI listed through fsspec: remote, and no handler registered for its scheme."""
    return fsspec_knows(uri) and split_scheme(uri)[0] not in registered_schemes()


def scan_object_storage(target: str, *, use_index: bool, max_age_s: float, refresh: bool) -> tuple[ScanResult, bool]:
    """The scan of an object-storage prefix, and whether it came from the index without a listing."""
    from mettaformat.remote.store import scan_remote

    scan = scan_remote(target, use_index=use_index, max_age_s=max_age_s, refresh=refresh)
    result = ScanResult(
        records=tuple(scan.records),
        unreadable=tuple(Exclusion(path=p, reason="unreadable", detail=d) for p, d in scan.unreadable),
    )
    return result, scan.from_index


def stale_selection(records: Sequence[PolicyRecord]) -> bool:
    """Whether records chosen from an unchecked index need a fresh listing: too many to check one
    by one, or one of them changed or vanished since it was listed."""
    from mettaformat.remote.store import changed_since_listed

    return len(records) > _MAX_CHECKED or changed_since_listed(list(records))


def save_remote(
    root: Path | str | None,
    base: MettaAgent,
    merged: dict[str, Any],
    name: str | None,
    path: str | os.PathLike[str] | None,
    *,
    compression: Compression,
    level: int | str,
    overwrite: bool,
    use_index: bool,
) -> PolicyRecord:
    from mettaformat.remote.index import prefix_of, update_remote_index
    from mettaformat.remote.store import list_objects, object_exists, read_remote_record

    if path is not None:
        target = os.fspath(path)
        check_file_name(target.rsplit("/", 1)[-1])
    else:
        assert isinstance(root, str)
        target = join_uri(root, check_file_name(name or default_name(merged)))
    if not target.endswith(STORE_SUFFIX):
        raise StoreError(f"PolicyStore writes mettaformat containers; {target!r} must end in {STORE_SUFFIX}")
    if not overwrite and object_exists(target):
        raise StoreError(f"{target} already exists; pass overwrite=True to replace it, or another name=")
    ckpt = checkpoint_for(base, merged, target.rsplit("/", 1)[-1], target)
    write_checkpoint(ckpt, target, compression=compression, level=level)  # uploaded whole, then visible
    record = read_remote_record(list_objects(target)[0])
    if use_index:
        update_remote_index(prefix_of(target), add=[record])
    return record


def delete_objects(
    doomed: Sequence[PolicyRecord], *, use_index: bool
) -> tuple[list[PolicyRecord], list[tuple[Path, str]]]:
    """Delete the objects of ``doomed`` and drop them from their prefixes' indexes.

    Returns:
        (deleted, (path, why) for each object left alone).
    """
    from mettaformat.remote.store import delete_remote_records

    deleted, not_deleted = delete_remote_records(list(doomed))
    if use_index:
        from mettaformat.remote.index import remove_from_indexes

        remove_from_indexes(deleted)
    return deleted, list(not_deleted)
