"""Reading :class:`PolicyRecord` values: header-only for containers, indexed for everything.

A container's metadata sits in its header, so a record costs one open and usually one read of
the file's first bytes (the preamble and the header; the tensor index is not checked). A legacy
``.pt`` file keeps its metadata inside the pickle, which must be imported whole; the
per-directory index (:mod:`.index`) and an in-process memo make that a one-time cost per file
version. Headers not in the page cache are read several at once.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mettaformat._files import open_regular
from mettaformat.anyformat import load_any
from mettaformat.checkpoint import Checkpoint
from mettaformat.checkpoint_io import checkpoint_fields
from mettaformat.container.opened import read_metadata
from mettaformat.errors import MettaFormatError, StoreError, naming_file
from mettaformat.migrations import apply_migrations
from mettaformat.signatures import format_of
from mettaformat.store.index import IndexEntry, read_index, update_index
from mettaformat.store.record import FileSignature, PolicyRecord, agent_step_of, effective_epoch, stat_signature
from mettaformat.store.selectors import Exclusion

__all__ = ["RecordCatalog", "ScanResult", "read_record"]

#: Attempts to read a file that keeps changing under us before reporting it unreadable.
_READ_ATTEMPTS: Final = 3
#: The in-process memo is dropped wholesale beyond this many entries (a bound, not an LRU:
#: the on-disk index makes a refill cheap).
_MEMO_LIMIT: Final = 200_000
#: Header reads in flight during a scan, and the number of unread files worth starting them for.
_CONCURRENT_READS: Final = 8
_CONCURRENT_MIN: Final = 16
#: Bytes read at once from the start of a file: the signature, the preamble and a typical header.
_HEAD_BYTES: Final = 16 << 10
_SNIFF_BYTES: Final = 64

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanResult:
    """Records of the readable files, and the files that could not be read."""

    records: tuple[PolicyRecord, ...]
    unreadable: tuple[Exclusion, ...]


def read_record(path: Path, signature: FileSignature) -> PolicyRecord:
    """Read one file's record without loading container weights.

    Args:
        path: the file.
        signature: its signature when it was listed; the read is rejected if the file no longer
            has it afterwards (it was replaced while being read, threat model FS4).

    Raises:
        StoreError: the file changed while it was read.
        FormatError, LegacyImportError, IntegrityError: the file is not a readable checkpoint.
        OSError: it cannot be opened.
    """
    fmt, ckpt = _read_header(path)
    if ckpt is None:
        ckpt = load_any(path, migrate=False)
    # The epoch comes from the metadata as stored: migrations fill in default counters, which
    # would hide that the file never recorded its epoch.
    epoch = effective_epoch(ckpt.metadata, path.name)
    apply_migrations(ckpt, warn=False)
    after = stat_signature(os.lstat(path))
    if after != signature:
        raise StoreError(f"{path} changed while it was being read", region=str(path))
    return PolicyRecord(
        path=path,
        uri=path.as_uri(),
        name=path.name,
        metadata=ckpt.metadata,
        epoch=epoch,
        agent_step=agent_step_of(ckpt.metadata),
        mtime_ns=signature.mtime_ns,
        size=signature.size,
        ino=signature.ino,
        format=fmt,
        model_type=ckpt.model_type,
    )


def _read_header(path: Path) -> tuple[str, Checkpoint | None]:
    """The format of ``path`` and, for a container, its checkpoint fields: one open and usually one
    read (the first bytes hold the preamble and the header; the tensor index is not checked)."""
    fd, st = open_regular(path)
    try:
        head = os.pread(fd, _HEAD_BYTES, 0)
        fmt = format_of(head[:_SNIFF_BYTES], st.st_size, path)
        if fmt != "mettaformat":
            return fmt, None
        with naming_file(path, container=True):
            preamble, metadata = read_metadata(fd, st.st_size, head)
            return fmt, checkpoint_fields(metadata, preamble)
    finally:
        os.close(fd)


def _head_cached(path: Path) -> bool:
    """True when the first bytes of ``path`` are in the page cache (reading them will not wait on the
    device); False when not, or when it cannot be told."""
    nowait = getattr(os, "RWF_NOWAIT", None)
    if nowait is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False  # the read proper reports why
    try:
        want = min(_HEAD_BYTES, os.fstat(fd).st_size)
        return os.preadv(fd, [bytearray(want)], 0, nowait) == want
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: a file system that cannot tell
        return False
    finally:
        os.close(fd)


class RecordCatalog:
    """Records for files, from an in-process memo, the directory index, or the file itself.

    Args:
        use_index: read and maintain ``<dir>/.mettaformat-index``.

    Thread-safe: scans may run concurrently; the memo is guarded by a lock.
    """

    def __init__(self, *, use_index: bool = True) -> None:
        self.use_index = use_index
        self._memo: dict[Path, PolicyRecord] = {}
        self._lock = threading.Lock()

    def scan(self, paths: Sequence[Path]) -> ScanResult:
        """Records for ``paths`` (files that vanished meanwhile are skipped).

        Files that cannot be read are reported in ``unreadable``, never raised: one damaged
        checkpoint must not hide the others.
        """
        unreadable: list[Exclusion] = []
        indexes: dict[Path, dict[str, IndexEntry]] = {}
        fresh: dict[Path, dict[str, IndexEntry]] = {}
        found: list[tuple[Path, FileSignature, PolicyRecord | None]] = []
        for path in paths:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # deleted since it was listed (a concurrent prune)
            except OSError as e:
                unreadable.append(Exclusion(path=path, reason="unreadable", detail=str(e)))
                continue
            if not stat.S_ISREG(st.st_mode):
                unreadable.append(Exclusion(path=path, reason="unreadable", detail="not a regular file"))
                continue
            signature = stat_signature(st)
            found.append((path, signature, self._cached(path, signature, indexes)))
        read: dict[Path, PolicyRecord] = {}
        for path, outcome in self._read_all([(p, sig) for p, sig, cached in found if cached is None]):
            if isinstance(outcome, PolicyRecord):
                read[path] = outcome
                fresh.setdefault(path.parent, {})[path.name] = IndexEntry.from_record(outcome)
            elif not isinstance(outcome, FileNotFoundError):  # a file deleted meanwhile is skipped
                unreadable.append(Exclusion(path=path, reason="unreadable", detail=str(outcome)))
        records = [r for path, _, cached in found if (r := cached or read.get(path)) is not None]
        if self.use_index:
            for directory, entries in fresh.items():
                update_index(directory, entries)
        return ScanResult(tuple(records), tuple(unreadable))

    def forget(self, paths: Iterable[Path]) -> None:
        """Drop deleted files from the memo and their directories' indexes."""
        by_dir: dict[Path, list[str]] = {}
        with self._lock:
            for path in paths:
                self._memo.pop(path, None)
                by_dir.setdefault(path.parent, []).append(path.name)
        if self.use_index:
            for directory, names in by_dir.items():
                update_index(directory, {}, removed=names)

    # -- internals -----------------------------------------------------------------------------
    def _read_all(
        self, missing: list[tuple[Path, FileSignature]]
    ) -> list[tuple[Path, PolicyRecord | MettaFormatError | OSError]]:
        """Read the records of files not in the memo or index, several at once: on a cold page
        cache or a network file system each header read waits on the device."""

        def read(item: tuple[Path, FileSignature]) -> tuple[Path, PolicyRecord | MettaFormatError | OSError]:
            try:
                return item[0], self._read(*item)
            except (MettaFormatError, OSError) as e:
                return item[0], e
            except Exception as e:  # one file must never hide the others
                logger.warning("unexpected failure reading %s", item[0], exc_info=True)
                return item[0], StoreError(f"unexpected {type(e).__name__}: {e}", region=str(item[0]))

        if len(missing) < _CONCURRENT_MIN:
            return [read(item) for item in missing]
        # Threads only pay where a read waits on the device: decoding headers holds the GIL, so
        # files whose first bytes are in the page cache are read here, one after the other.
        done, waiting = [], []
        for item in missing:
            if _head_cached(item[0]):
                done.append(read(item))
            else:
                waiting.append(item)
        if len(waiting) < _CONCURRENT_MIN:
            return done + [read(item) for item in waiting]
        with ThreadPoolExecutor(_CONCURRENT_READS, thread_name_prefix="mettaformat-scan") as pool:
            return done + list(pool.map(read, waiting))

    def _cached(
        self, path: Path, signature: FileSignature, indexes: dict[Path, dict[str, IndexEntry]]
    ) -> PolicyRecord | None:
        with self._lock:
            record = self._memo.get(path)
        if record is not None and record.signature == signature:
            return record
        if not self.use_index:
            return None
        directory = path.parent
        if directory not in indexes:
            indexes[directory] = read_index(directory)
        entry = indexes[directory].get(path.name)
        if entry is None or entry.signature != signature:
            return None
        record = entry.to_record(path)
        self._remember(record)
        return record

    def _read(self, path: Path, signature: FileSignature) -> PolicyRecord:
        for attempt in range(_READ_ATTEMPTS):
            try:
                record = read_record(path, signature)
            except StoreError:
                if attempt == _READ_ATTEMPTS - 1:
                    raise
                st = os.lstat(path)  # replaced meanwhile: read the new version
                if not stat.S_ISREG(st.st_mode):
                    raise StoreError(f"{path} is no longer a regular file", region=str(path)) from None
                signature = stat_signature(st)
                continue
            self._remember(record)
            return record
        raise AssertionError("unreachable")

    def _remember(self, record: PolicyRecord) -> None:
        with self._lock:
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[record.path] = record
