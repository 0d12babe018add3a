"""The optional per-directory index: cached record fields, so listing need not open every file.

``<dir>/.mettaformat-index`` is one msgpack map::

    {"format": "mettaformat-store-index", "version": 1,
     "entries": {"model_0050.pt": {"mtime_ns": int, "size": int, "ino": int, "format": str,
                                   "epoch": int, "agent_step": int, "model_type": str | None,
                                   "metadata": map}}}

It is only a cache, never a source of truth:

- an entry is used only while the file's mtime, size and inode still match (an atomic replace
  changes the inode and the mtime, threat model FS4), otherwise the file is read again;
- it is written atomically (temp file + rename), so readers see the old or the new index,
  never a torn one; concurrent writers may lose each other's updates, which only costs a
  re-read of those files later;
- anything unexpected in it (a symlink, an oversized file, bad msgpack, wrong types) makes the
  whole index count as absent;
- entries are only written for metadata that survives a msgpack round trip unchanged (no
  tuples, no non-string keys), so a record read from the index equals one read from the file.

Framework-neutral (no torch).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from mettaformat._atomic import atomic_fd
from mettaformat.container.header import decode_msgpack, encode_msgpack
from mettaformat.errors import MettaFormatError
from mettaformat.store.record import FileSignature, PolicyRecord
from mettaformat.store.uri import INDEX_FILE_NAME, is_listable_name

__all__ = ["INDEX_FORMAT", "INDEX_VERSION", "MAX_INDEX_BYTES", "IndexEntry", "read_index", "update_index"]

INDEX_FORMAT: Final = "mettaformat-store-index"
INDEX_VERSION: Final = 1
#: An index larger than this is ignored (about 100k entries of generous metadata).
MAX_INDEX_BYTES: Final = 256 << 20
_INT64_MIN: Final = -(1 << 63)
_UINT64_MAX: Final = (1 << 64) - 1

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class IndexEntry:
    """The cached fields of one checkpoint file (see :class:`PolicyRecord`)."""

    signature: FileSignature
    format: str
    epoch: int
    agent_step: int
    model_type: str | None
    metadata: Mapping[str, Any]

    @classmethod
    def from_record(cls, record: PolicyRecord) -> IndexEntry:
        return cls(
            signature=record.signature,
            format=record.format,
            epoch=record.epoch,
            agent_step=record.agent_step,
            model_type=record.model_type,
            metadata=record.metadata,
        )

    def to_record(self, path: Path) -> PolicyRecord:
        return PolicyRecord(
            path=path,
            uri=path.as_uri(),
            name=path.name,
            metadata=self.metadata,
            epoch=self.epoch,
            agent_step=self.agent_step,
            mtime_ns=self.signature.mtime_ns,
            size=self.signature.size,
            ino=self.signature.ino,
            format=self.format,
            model_type=self.model_type,
        )

    def to_msgpack(self) -> dict[str, Any]:
        return {
            "mtime_ns": self.signature.mtime_ns,
            "size": self.signature.size,
            "ino": self.signature.ino,
            "format": self.format,
            "epoch": self.epoch,
            "agent_step": self.agent_step,
            "model_type": self.model_type,
            "metadata": dict(self.metadata),
        }


def round_trips(value: Any, depth: int = 0) -> bool:
    """Whether msgpack gives ``value`` back equal and of the same types."""
    if depth > 32:
        return False
    if value is None or isinstance(value, (bool, str, bytes)):
        return True
    if isinstance(value, int):
        return _INT64_MIN <= value <= _UINT64_MAX
    if isinstance(value, float):
        return type(value) is float
    if type(value) is list:
        return all(round_trips(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and round_trips(v, depth + 1) for k, v in value.items())
    return False  # tuples come back as lists, dict subclasses as dicts, others do not encode


def _is_int(value: Any) -> bool:
    return type(value) is int


def _parse_entry(raw: Any) -> IndexEntry | None:
    if not isinstance(raw, dict):
        return None
    ints = ("mtime_ns", "size", "ino", "epoch", "agent_step")
    if not all(_is_int(raw.get(k)) for k in ints) or raw["size"] < 0:
        return None
    fmt, model_type, metadata = raw.get("format"), raw.get("model_type"), raw.get("metadata")
    if not isinstance(fmt, str) or not (model_type is None or isinstance(model_type, str)):
        return None
    if not isinstance(metadata, dict) or not round_trips(metadata):
        return None  # e.g. bytes keys: never written by update_index, so not an entry of ours
    return IndexEntry(
        signature=FileSignature(mtime_ns=raw["mtime_ns"], size=raw["size"], ino=raw["ino"]),
        format=fmt,
        epoch=raw["epoch"],
        agent_step=raw["agent_step"],
        model_type=model_type,
        metadata=metadata,
    )


def read_index(directory: Path) -> dict[str, IndexEntry]:
    """The valid entries of ``directory``'s index; empty when there is none or it is unusable.

    Never raises: the index is a cache, and a damaged one is simply rebuilt.
    """
    path = directory / INDEX_FILE_NAME
    try:
        # O_NOFOLLOW + S_ISREG: a symlinked or special index (threat model FS1) is ignored, not read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_INDEX_BYTES:
            logger.warning("ignoring %s: not a regular file of at most %d bytes", path, MAX_INDEX_BYTES)
            return {}
        os.set_blocking(fd, True)
        data = b""
        while len(data) < st.st_size:
            chunk = os.read(fd, st.st_size - len(data))
            if not chunk:
                break
            data += chunk
    except OSError:
        return {}
    finally:
        os.close(fd)
    try:
        value = decode_msgpack(data, region="store index")
    except MettaFormatError as e:
        logger.warning("ignoring the damaged store index %s: %s", path, e)
        return {}
    if not (
        isinstance(value, dict)
        and value.get("format") == INDEX_FORMAT
        and value.get("version") == INDEX_VERSION
        and isinstance(value.get("entries"), dict)
    ):
        return {}
    entries: dict[str, IndexEntry] = {}
    for name, raw in value["entries"].items():
        # Only plain listable names: an entry can never point outside its directory.
        plain = isinstance(name, str) and is_listable_name(name) and "/" not in name and "\\" not in name
        entry = _parse_entry(raw) if plain else None
        if entry is not None:
            entries[name] = entry
    return entries


def update_index(
    directory: Path,
    fresh: Mapping[str, IndexEntry],
    *,
    removed: Iterable[str] = (),
) -> bool:
    """Merge ``fresh`` entries into ``directory``'s index and write it atomically.

    The index is re-read just before writing, so that entries another process added in the
    meantime are kept (a writer racing between that read and the rename can still lose one;
    that file is simply read again next time).

    Args:
        directory: the directory the entries' names live in.
        fresh: entries to add or replace, by file name.
        removed: names to drop (files just deleted). Entries for files that no longer exist
            are dropped as well.

    Returns:
        True when the index was written; False when it could not be (a read-only directory,
        a full disk): the index is optional, so this is not an error.
    """
    entries = read_index(directory)
    entries.update({name: e for name, e in fresh.items() if round_trips(dict(e.metadata))})
    for name in removed:
        entries.pop(name, None)
    entries = {name: e for name, e in entries.items() if name in fresh or os.path.lexists(directory / name)}
    payload = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "entries": {name: entries[name].to_msgpack() for name in sorted(entries)},
    }
    try:
        data = encode_msgpack(payload)
        with atomic_fd(directory / INDEX_FILE_NAME) as fd:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
    except (MettaFormatError, OSError, ValueError, TypeError) as e:
        logger.info("store index %s not updated: %s", directory / INDEX_FILE_NAME, e)
        return False
    return True
