"""The PolicyStore's listing, records, loads and deletes for a bucket or HTTP-listable prefix.

A listing gives every object's size and ETag, so a record costs exactly one range request (the
header); records are read ``IN_FLIGHT`` at a time and remembered per URI + ETag, and kept in the
prefix's index object (:mod:`mettaformat.remote.index`), which a recent listing lets a reader
use without listing again. Loading and deleting are pinned to the ETag that was listed: a
policy re-saved in between is reported, never silently swapped.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import torch

from mettaformat.errors import MettaFormatError, RemoteChangedError, RemoteNotFoundError
from mettaformat.remote.index import (
    DEFAULT_MAX_AGE_S,
    RemoteIndex,
    read_remote_index,
    record_from_entry,
    write_listed_index,
)
from mettaformat.remote.source import IN_FLIGHT, RemoteSource
from mettaformat.remote.transport import call, conditional_writes, fresh_info, version_tag
from mettaformat.remote.uri import filesystem
from mettaformat.store.record import PolicyRecord, agent_step_of, effective_epoch
from mettaformat.store.uri import INDEX_FILE_NAME, is_listable_name

__all__ = [
    "RemoteObject",
    "RemoteScan",
    "changed_since_listed",
    "delete_remote_records",
    "list_objects",
    "load_remote_record",
    "modified_ns",
    "object_exists",
    "scan_remote",
]

_GLOB: Final = re.compile(r"[*?[]")
_MEMO_LIMIT: Final = 100_000
#: The first read of a listed object: a policy's header (metadata and index) is a few kB.
RECORD_FIRST_READ: Final = 16 << 10


@dataclass(frozen=True)
class RemoteObject:
    uri: str
    path: str  # within the filesystem (bucket/key)
    size: int | None  # None where the listing does not say (HTTP index pages)
    etag: str | None
    mtime_ns: int


def _mtime_ns(info: dict[str, Any]) -> int:
    value = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("last_modified")
    if isinstance(value, datetime):
        return int(value.timestamp() * 1e9)
    if isinstance(value, (int, float)):
        return int(value * 1e9)
    return 0


def object_exists(uri: str) -> bool:
    """Whether an object exists at ``uri`` (one metadata request)."""
    fs, path = filesystem(uri)
    try:
        fresh_info(fs, path, uri, "checking whether it exists")
    except RemoteNotFoundError:
        return False
    return True


def modified_ns(uri: str) -> int | None:
    """When the object at ``uri`` was last written (ns since the epoch), or None if there is none."""
    fs, path = filesystem(uri)
    try:
        info = fresh_info(fs, path, uri, "checking when it was written")
    except RemoteNotFoundError:
        return None
    return _mtime_ns(info) if info.get("type") == "file" else None


def list_objects(uri: str) -> list[RemoteObject]:
    """The checkpoint objects a URI names: one object, a prefix ("directory") or a glob.

    Raises:
        RemoteNotFoundError: nothing exists at the URI.
        RemoteError: the listing failed.
    """
    return _list(uri)[0]


def _list(uri: str) -> tuple[list[RemoteObject], RemoteObject | None, bool]:
    """The checkpoint objects, the store index object (if any), and whether ``uri`` is a prefix."""
    fs, path = filesystem(uri)
    scheme = uri.split("://", 1)[0]
    fs.invalidate_cache()  # a listing must show what is there now, not what was there before
    is_prefix = False
    if _GLOB.search(path):
        infos = list(call(lambda: fs.glob(path, detail=True), uri, "listing").values())
    elif path.endswith("/") or uri.endswith("/"):  # a prefix: no metadata request first
        infos, is_prefix = call(lambda: fs.ls(path, detail=True), uri, "listing"), True
    else:
        info = call(lambda: fs.info(path), uri, "listing")
        if info.get("type") == "file":
            infos = [info]
        else:
            infos, is_prefix = call(lambda: fs.ls(path, detail=True), uri, "listing"), True
    out, index = [], None
    for info in infos:
        name = info["name"].rstrip("/")
        base = name.rsplit("/", 1)[-1]
        full = name if "://" in name else f"{scheme}://{name}"
        size = info.get("size")
        obj = RemoteObject(full, name, size if isinstance(size, int) else None, version_tag(info), _mtime_ns(info))
        if info.get("type") == "file" and base == INDEX_FILE_NAME:
            index = obj
        elif info.get("type") == "file" and is_listable_name(base):
            out.append(obj)
    out.sort(key=lambda o: o.uri)
    return out, index, is_prefix


_memo: dict[tuple[str, str], PolicyRecord] = {}
_memo_lock = threading.Lock()


def read_remote_record(obj: RemoteObject) -> PolicyRecord:
    """One object's record from its header (one range request); legacy pickles are read whole."""
    from mettaformat.checkpoint_io import read_checkpoint
    from mettaformat.migrations import apply_migrations
    from mettaformat.remote.formats import read_remote_source

    key = (obj.uri, obj.etag) if obj.etag else None
    if key is not None:
        with _memo_lock:
            known = _memo.get(key)
        if known is not None:
            return known
    source = RemoteSource(obj.uri, size=obj.size, etag=obj.etag if obj.size is not None else None,
                          first_read=RECORD_FIRST_READ)
    obj = RemoteObject(obj.uri, obj.path, source.size, source.version.etag, obj.mtime_ns)
    ckpt, fmt = read_remote_source(
        source, lazy=True, reader=lambda s: read_checkpoint(s, with_tensors=False)  # type: ignore[arg-type]
    )
    name = obj.path.rsplit("/", 1)[-1]
    epoch = effective_epoch(ckpt.metadata, name)
    apply_migrations(ckpt, warn=False)
    record = PolicyRecord(
        path=Path(obj.path),
        uri=obj.uri,
        name=name,
        metadata=ckpt.metadata,
        epoch=epoch,
        agent_step=agent_step_of(ckpt.metadata),
        mtime_ns=obj.mtime_ns,
        size=source.size,
        format=fmt,
        model_type=ckpt.model_type,
        etag=obj.etag,
    )
    if key is not None:
        with _memo_lock:
            if len(_memo) > _MEMO_LIMIT:
                _memo.clear()
            _memo[key] = record
    return record


@dataclass(frozen=True)
class RemoteScan:
    records: list[PolicyRecord]
    unreadable: list[tuple[Path, str]]
    from_index: bool  # taken from a trusted index without listing: verify what is selected


def scan_remote(
    uri: str, *, use_index: bool = True, max_age_s: float = DEFAULT_MAX_AGE_S, refresh: bool = False
) -> RemoteScan:
    """Records of every checkpoint at ``uri``, and the unreadable objects.

    A prefix (``.../``) whose index a full listing vouched for less than ``max_age_s`` ago is
    read from the index alone (one GET; see :mod:`mettaformat.remote.index` for the contract).
    Otherwise the prefix is listed: index entries count while their ETag matches the listed
    one, other objects have their header read (in parallel), and the index is written back.
    ``refresh`` always lists.
    """
    index: RemoteIndex | None = None
    if use_index and uri.endswith("/") and not _GLOB.search(uri):
        index = read_remote_index(uri)
        if not refresh and index.trusted(max_age_s):
            return RemoteScan(index.records(), index.unreadable_objects(), from_index=True)
    listed_at = time.time()
    objects, index_object, is_prefix = _list(uri)
    if use_index and index is None and is_prefix and index_object is not None:
        index = read_remote_index(uri)
    entries = index.entries if index is not None else {}
    known_bad = index.unreadable if index is not None else {}
    records: list[PolicyRecord] = []
    unreadable: list[tuple[Path, str]] = []
    bad: dict[str, list[str]] = {}
    pending = []
    for obj in objects:
        name = obj.path.rsplit("/", 1)[-1]
        raw = entries.get(name)
        known = record_from_entry(raw, obj.uri, obj.path, obj.size, obj.etag) if raw and obj.size is not None else None
        if known is not None:
            records.append(known)
        elif obj.etag is not None and known_bad.get(name, [None])[0] == obj.etag:
            unreadable.append((Path(obj.path), known_bad[name][1]))  # the same broken version: not read again
            bad[name] = known_bad[name]
        else:
            pending.append(obj)

    def one(obj: RemoteObject) -> PolicyRecord | tuple[Path, str] | None:
        try:
            return read_remote_record(obj)
        except RemoteNotFoundError:
            return None  # deleted since it was listed
        except MettaFormatError as e:
            return (Path(obj.path), str(e))

    with ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="mettaformat-scan") as pool:
        for obj, result in zip(pending, pool.map(one, pending), strict=True):
            if isinstance(result, PolicyRecord):
                records.append(result)
            elif result is not None:
                unreadable.append(result)
                if obj.etag is not None:
                    bad[obj.path.rsplit("/", 1)[-1]] = [obj.etag, result[1]]
    if index is not None:
        changed = bool(pending) or len(entries) != len(records) or len(known_bad) != len(bad)
        if changed or conditional_writes(filesystem(uri)[0]):  # there, a new listing also renews trust
            write_listed_index(index, records, bad, listed_at)
    return RemoteScan(records, unreadable, from_index=False)


def changed_since_listed(records: list[PolicyRecord]) -> bool:
    """Whether any record's object is gone or has another ETag now (one HEAD each, in parallel)."""

    def changed(record: PolicyRecord) -> bool:
        fs, path = filesystem(record.uri)
        try:
            info = fresh_info(fs, path, record.uri, "checking that it is unchanged")
        except RemoteNotFoundError:
            return True
        return version_tag(info) != record.etag or info.get("size") != record.size

    if not records:
        return False
    with ThreadPoolExecutor(min(IN_FLIGHT, len(records)), thread_name_prefix="mettaformat-check") as pool:
        return any(pool.map(changed, records))


def load_remote_record(record: PolicyRecord, device: str | torch.device) -> Any:
    """The checkpoint of ``record``, read from the version that was listed.

    Raises:
        RemoteChangedError: the object was replaced since it was listed.
    """
    from mettaformat.checkpoint_io import read_checkpoint
    from mettaformat.migrations import apply_migrations
    from mettaformat.remote.formats import read_remote_source

    source = RemoteSource(record.uri, size=record.size, etag=record.etag)
    ckpt, _ = read_remote_source(
        source, lazy=False, reader=lambda s: read_checkpoint(s, device=device, lazy=False)  # type: ignore[arg-type]
    )
    ckpt.uri = ckpt.uri or record.uri
    apply_migrations(ckpt)
    return ckpt


def delete_remote_records(records: list[PolicyRecord]) -> tuple[list[PolicyRecord], list[tuple[Path, str]]]:
    """Delete each record's object if it still has the ETag that was listed; (deleted, skipped)."""
    deleted: list[PolicyRecord] = []
    skipped: list[tuple[Path, str]] = []
    for record in records:
        fs, path = filesystem(record.uri)
        try:
            info = fresh_info(fs, path, record.uri, "checking before delete")
            if record.etag is not None and version_tag(info) != record.etag:
                raise RemoteChangedError("changed since it was listed", uri=record.uri)
            call(lambda: fs.rm_file(path), record.uri, "deleting")  # noqa: B023
        except RemoteNotFoundError:
            pass  # already gone
        except MettaFormatError as e:
            skipped.append((record.path, str(e)))
            continue
        deleted.append(record)
    return deleted, skipped
