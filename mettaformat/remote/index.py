"""The store index of an object-storage prefix: records of every checkpoint in one object.

``<prefix>/.mettaformat-index`` holds the same entries as a local directory's index (see
:mod:`mettaformat.store.index`), each with the object's ETag. A listing gives every object's
ETag, so an entry is used only while its ETag still matches; any other object has its header
read by range and the index is rewritten (an atomic upload). Selecting from 1,000 checkpoints
then costs one listing and one GET instead of 1,000 header reads.

It is only a cache: a missing, damaged or oversized index counts as empty, concurrent writers
may lose each other's entries (costing re-reads later), and a read-only store (HTTP) simply
has none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from mettaformat.container.header import decode_msgpack, encode_msgpack
from mettaformat.errors import MettaFormatError
from mettaformat.remote.uri import join_uri
from mettaformat.store.index import MAX_INDEX_BYTES, _parse_entry, round_trips
from mettaformat.store.record import PolicyRecord
from mettaformat.store.uri import INDEX_FILE_NAME

__all__ = ["read_remote_index", "record_from_entry", "write_remote_index"]

REMOTE_INDEX_FORMAT: Final = "mettaformat-store-index-remote"
REMOTE_INDEX_VERSION: Final = 1

logger = logging.getLogger(__name__)


def index_uri(prefix: str) -> str:
    return join_uri(prefix, INDEX_FILE_NAME)


def read_remote_index(prefix: str, size: int, etag: str | None) -> dict[str, dict[str, Any]]:
    """The entries of the index object listed with ``size`` and ``etag`` (empty if unusable)."""
    from mettaformat.remote.source import RemoteSource

    if size > MAX_INDEX_BYTES:
        return {}
    try:
        source = RemoteSource(index_uri(prefix), size=size, etag=etag, first_read=size)
        raw = decode_msgpack(source.read(0, size, "index"), region="index")
    except MettaFormatError as e:
        logger.info("ignoring the store index at %s: %s", prefix, e)
        return {}
    if not isinstance(raw, dict) or raw.get("format") != REMOTE_INDEX_FORMAT or raw.get("version") != 1:
        return {}
    entries = raw.get("entries")
    return entries if isinstance(entries, dict) else {}


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


def write_remote_index(prefix: str, records: Iterable[PolicyRecord]) -> None:
    """Upload the index of ``records`` (best effort: a read-only store keeps none)."""
    from mettaformat._atomic import atomic_fd
    from mettaformat.container.codecs.base import pwrite_all

    entries = {
        r.name: {
            "mtime_ns": r.mtime_ns,
            "size": r.size,
            "ino": 0,
            "etag": r.etag,
            "format": r.format,
            "epoch": r.epoch,
            "agent_step": r.agent_step,
            "model_type": r.model_type,
            "metadata": dict(r.metadata),
        }
        for r in records
        if r.etag is not None and round_trips(dict(r.metadata))
    }
    data = encode_msgpack({"format": REMOTE_INDEX_FORMAT, "version": REMOTE_INDEX_VERSION, "entries": entries})
    try:
        with atomic_fd(index_uri(prefix)) as fd:
            pwrite_all(fd, data, 0)
    except (MettaFormatError, OSError) as e:
        logger.info("not writing the store index at %s: %s", prefix, e)
