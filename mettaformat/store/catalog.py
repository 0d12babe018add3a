"""Reading :class:`PolicyRecord` values: header-only for containers, indexed for everything.

A container's metadata sits in its header, so a record costs one open and three small reads
(``read_checkpoint(path, with_tensors=False)``). A legacy ``.pt`` file keeps its metadata inside
the pickle, which must be imported whole; the per-directory index (:mod:`.index`) and an
in-process memo make that a one-time cost per file version.
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

from mettaformat.anyformat import load_any, sniff_format
from mettaformat.checkpoint_io import read_checkpoint
from mettaformat.errors import MettaFormatError, StoreError
from mettaformat.migrations import apply_migrations
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
    fmt = sniff_format(path)
    if fmt == "mettaformat":
        ckpt = read_checkpoint(path, with_tensors=False)
    else:
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
        with ThreadPoolExecutor(_CONCURRENT_READS, thread_name_prefix="mettaformat-scan") as pool:
            return list(pool.map(read, missing))

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
