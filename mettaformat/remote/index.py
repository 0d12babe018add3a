"""The store index of an object-storage prefix: the records of every checkpoint in one object.

``<prefix>/.mettaformat-index`` holds the same entries as a local directory's index (see
:mod:`mettaformat.store.index`), each with the object's ETag and size, the objects that could
not be read, and ``listed_at``: when a full listing last reconciled it.

The contract, where the backend has conditional writes (S3):

- Every ``PolicyStore.save`` and ``prune`` updates the index with a compare-and-swap on its ETag
  (re-read and retried when another writer got there first), so checkpoints written through a
  store are in it as soon as the call returns.
- A reader trusts an index whose full listing is younger than ``max_age_s``: selecting then costs
  one GET, whatever the number of checkpoints. Objects written or deleted by other tools
  (``aws s3 cp``, ``save_file`` to a URI) show up when the index is older than that, when a
  selected checkpoint turns out missing or replaced (the selection is then redone from a full
  listing), or on ``scan(refresh=True)``.
- ``listed_at`` is the lister's clock, compared with the reader's: machines whose clocks differ
  by ``d`` stretch that window by ``d`` (NTP keeps ``d`` well under a second).
- An older index is reconciled with a full listing (entries count only while their ETag matches
  the listed one; anything else has its header read by range) and written back conditionally.

Elsewhere (GCS, HTTP, other fsspec stores) every scan lists; the index only saves header reads.
It is only a cache: a missing, damaged or oversized index counts as empty.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from mettaformat.container.header import decode_msgpack, encode_msgpack
from mettaformat.errors import MettaFormatError
from mettaformat.remote.transport import conditional_writes, get_versioned, put_if_unchanged
from mettaformat.remote.uri import filesystem, join_uri
from mettaformat.store.index import MAX_INDEX_BYTES, _parse_entry, round_trips
from mettaformat.store.record import PolicyRecord
from mettaformat.store.uri import INDEX_FILE_NAME, is_listable_name

__all__ = [
    "DEFAULT_MAX_AGE_S",
    "RemoteIndex",
    "prefix_of",
    "read_remote_index",
    "record_from_entry",
    "remove_from_indexes",
    "update_remote_index",
]

REMOTE_INDEX_FORMAT: Final = "mettaformat-store-index-remote"
REMOTE_INDEX_VERSION: Final = 2
#: How long a full listing vouches for the index (seconds).
DEFAULT_MAX_AGE_S: Final = 60.0
#: Compare-and-swap attempts of one update before giving up (the index is only a cache).
_UPDATE_ATTEMPTS: Final = 5

logger = logging.getLogger(__name__)


def index_uri(prefix: str) -> str:
    return join_uri(prefix, INDEX_FILE_NAME)


def prefix_of(uri: str) -> str:
    """The "directory" of an object URI, as a prefix (``s3://b/run/``)."""
    return uri.rsplit("/", 1)[0] + "/"


@dataclass
class RemoteIndex:
    """One version of a prefix's index object (``etag`` None: there is none yet)."""

    prefix: str
    etag: str | None = None
    listed_at: float | None = None
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    unreadable: dict[str, list[str]] = field(default_factory=dict)  # name -> [etag, why]

    def trusted(self, max_age_s: float, now: float | None = None) -> bool:
        """Whether the last full listing is recent enough to skip listing again.

        Only where the store keeps the index current with conditional writes."""
        if self.etag is None or self.listed_at is None or max_age_s <= 0:
            return False
        age = (time.time() if now is None else now) - self.listed_at
        return -max_age_s <= age <= max_age_s and conditional_writes(filesystem(self.prefix)[0])

    def records(self) -> list[PolicyRecord]:
        """The records of its entries, named as under its prefix."""
        out = []
        base = filesystem(self.prefix)[1].rstrip("/")
        for name, raw in self.entries.items():
            size, etag = raw.get("size"), raw.get("etag")
            if not isinstance(size, int) or "/" in name or not is_listable_name(name):
                continue
            record = record_from_entry(raw, join_uri(self.prefix, name), f"{base}/{name}", size, etag)
            if record is not None and isinstance(etag, str):
                out.append(record)
        return sorted(out, key=lambda r: r.uri)

    def unreadable_objects(self) -> list[tuple[Path, str]]:
        base = filesystem(self.prefix)[1].rstrip("/")
        return [(Path(f"{base}/{n}"), why) for n, (_, why) in sorted(self.unreadable.items())]

    def encode(self) -> bytes:
        return encode_msgpack(
            {
                "format": REMOTE_INDEX_FORMAT,
                "version": REMOTE_INDEX_VERSION,
                "listed_at": self.listed_at,
                "entries": self.entries,
                "unreadable": self.unreadable,
            }
        )


def read_remote_index(prefix: str) -> RemoteIndex:
    """The index object of ``prefix`` (one GET on S3); an empty one if missing or unusable."""
    uri = index_uri(prefix)
    fs, path = filesystem(uri)
    try:
        got = get_versioned(fs, path, uri, MAX_INDEX_BYTES)
    except MettaFormatError as e:
        logger.info("ignoring the store index at %s: %s", prefix, e)
        return RemoteIndex(prefix)
    if got is None:
        return RemoteIndex(prefix)
    data, etag = got
    index = RemoteIndex(prefix, etag=etag)  # unusable content is still replaced conditionally
    try:
        raw = decode_msgpack(data, region="index")
    except MettaFormatError as e:
        logger.info("ignoring the store index at %s: %s", prefix, e)
        return index
    if not isinstance(raw, dict) or raw.get("format") != REMOTE_INDEX_FORMAT or raw.get("version") != 2:
        return index
    entries, unreadable, listed_at = raw.get("entries"), raw.get("unreadable"), raw.get("listed_at")
    index.entries = {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, dict)} if isinstance(
        entries, dict) else {}
    index.unreadable = {
        k: [str(v[0]), str(v[1])] for k, v in unreadable.items() if isinstance(v, list) and len(v) == 2
    } if isinstance(unreadable, dict) else {}
    index.listed_at = float(listed_at) if isinstance(listed_at, (int, float)) else None
    return index


def record_from_entry(raw: Any, uri: str, path: str, size: int, etag: str | None) -> PolicyRecord | None:
    """The record an entry describes, if it is well formed and still about this object version."""
    entry = _parse_entry(raw)
    if entry is None or etag is None or raw.get("etag") != etag or entry.signature.size != size:
        return None
    return PolicyRecord(
        path=Path(path),
        uri=uri,
        name=path.rsplit("/", 1)[-1],
        metadata=entry.metadata,
        epoch=entry.epoch,
        agent_step=entry.agent_step,
        mtime_ns=entry.signature.mtime_ns,
        size=size,
        format=entry.format,
        model_type=entry.model_type,
        etag=etag,
    )


def entry_of(record: PolicyRecord) -> dict[str, Any] | None:
    if record.etag is None or not round_trips(dict(record.metadata)):
        return None
    return {
        "mtime_ns": record.mtime_ns,
        "size": record.size,
        "ino": 0,
        "etag": record.etag,
        "format": record.format,
        "epoch": record.epoch,
        "agent_step": record.agent_step,
        "model_type": record.model_type,
        "metadata": dict(record.metadata),
    }


def write_listed_index(
    previous: RemoteIndex, records: Iterable[PolicyRecord], unreadable: dict[str, list[str]], listed_at: float
) -> None:
    """Replace ``previous`` with the index of a full listing started at ``listed_at``.

    Skipped when another writer changed the index since ``previous`` was read: its change may
    be newer than this listing, and the next reader reconciles again."""
    entries = {r.name: e for r in records if (e := entry_of(r)) is not None}
    index = RemoteIndex(previous.prefix, listed_at=listed_at, entries=entries, unreadable=unreadable)
    _put(previous, index.encode())


def update_remote_index(prefix: str, *, add: Iterable[PolicyRecord] = (), remove: Iterable[str] = ()) -> None:
    """Add records to / remove names from the index of ``prefix``, if it has one (best effort).

    A compare-and-swap on the index's ETag, re-read and retried when another writer got there
    first; ``listed_at`` is kept (these changes are the store's own, not a new listing)."""
    added, removed = list(add), set(remove)
    for _ in range(_UPDATE_ATTEMPTS):
        index = read_remote_index(prefix)
        if index.etag is None:
            return  # none yet: the next scan lists and writes one
        for name in removed:
            index.entries.pop(name, None)
            index.unreadable.pop(name, None)
        for record in added:
            entry = entry_of(record)
            if entry is None:
                index.entries.pop(record.name, None)
            else:
                index.entries[record.name] = entry
            index.unreadable.pop(record.name, None)
        if _put(index, index.encode()):
            return
    logger.info("gave up updating the store index at %s (concurrent writers)", prefix)


def remove_from_indexes(deleted: Iterable[PolicyRecord]) -> None:
    """Drop deleted objects from the index of each prefix they were in."""
    by_prefix: dict[str, list[str]] = {}
    for record in deleted:
        by_prefix.setdefault(prefix_of(record.uri), []).append(record.name)
    for prefix, names in sorted(by_prefix.items()):
        update_remote_index(prefix, remove=names)


def _put(previous: RemoteIndex, data: bytes) -> bool:
    uri = index_uri(previous.prefix)
    fs, path = filesystem(uri)
    try:
        return put_if_unchanged(fs, path, uri, data, previous.etag)
    except (MettaFormatError, OSError) as e:
        logger.info("not writing the store index at %s: %s", previous.prefix, e)
        return True  # a read-only store keeps none: retrying would not help
