"""An optional, bounded local cache of remote byte ranges, shared safely by concurrent processes.

Entries are keyed by URI + ETag + range, so a replaced object never hits an old entry. Each entry
is one file written to a temp name and renamed into place (readers never see half an entry,
writers never block one another); a hit refreshes the file's mtime, and when the directory
grows past its limit the least recently used entries are deleted. Two processes evicting at once
at worst delete an entry twice (ignored) or one that was just used (a later miss).

Enable it with ``MF_CACHE_DIR`` (and ``MF_CACHE_MAX_BYTES``, default 10 GiB) or
:func:`mettaformat.remote.use_cache`.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from pathlib import Path
from typing import Final

__all__ = ["DEFAULT_CACHE_BYTES", "RangeCache", "default_cache", "use_cache"]

DEFAULT_CACHE_BYTES: Final = 10 << 30
_SUFFIX: Final = ".range"


class RangeCache:
    """Cached byte ranges of remote objects in ``directory``, at most ``max_bytes`` in total (LRU).

    Args:
        directory: created if missing; may be shared by several processes.
        max_bytes: the size limit; least recently used entries are evicted beyond it.
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"cache size limit must be positive, not {max_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        self._added = 0  # bytes stored since the last eviction scan

    def __repr__(self) -> str:
        return f"RangeCache({str(self.directory)!r}, max_bytes={self.max_bytes})"

    def _entry(self, uri: str, etag: str, start: int, end: int) -> Path:
        key = hashlib.sha256(f"{uri}\0{etag}\0{start}\0{end}".encode()).hexdigest()
        return self.directory / (key + _SUFFIX)

    def get(self, uri: str, etag: str, start: int, end: int) -> bytes | None:
        """The cached bytes of ``[start, end)`` of ``uri`` at version ``etag``, or None."""
        path = self._entry(uri, etag, start, end)
        try:
            data = path.read_bytes()
            os.utime(path)  # the LRU clock
        except OSError:
            self.misses += 1
            return None
        if len(data) != end - start:  # damaged (a full disk mid-write elsewhere): forget it
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return data

    def put(self, uri: str, etag: str, start: int, end: int, data: bytes | memoryview) -> None:
        """Store a range (best effort: a full disk or a read-only directory only skips caching)."""
        if len(data) > self.max_bytes:
            return
        path = self._entry(uri, etag, start, end)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            self._added += len(data)
            due = self._added > self.max_bytes // 16
            if due:
                self._added = 0
        if due:
            self.evict()

    def size(self) -> int:
        """Bytes currently stored."""
        return sum(size for _, size, _ in self._entries())

    def _entries(self) -> list[tuple[float, int, Path]]:
        out = []
        with os.scandir(self.directory) as it:
            for e in it:
                if e.name.endswith(_SUFFIX) and not e.name.startswith("."):
                    try:
                        st = e.stat()
                    except OSError:
                        continue  # evicted by another process meanwhile
                    out.append((st.st_mtime, st.st_size, Path(e.path)))
        return out

    def evict(self) -> int:
        """Delete least recently used entries until the total fits the limit; return bytes freed."""
        entries = sorted(self._entries(), key=lambda e: e[0])
        total = sum(size for _, size, _ in entries)
        freed = 0
        for _, size, path in entries:
            if total - freed <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            freed += size
        return freed

    def clear(self) -> None:
        for _, _, path in self._entries():
            path.unlink(missing_ok=True)


_configured: RangeCache | None = None
_from_env: tuple[str, RangeCache] | None = None


def use_cache(directory: str | os.PathLike[str] | None, max_bytes: int = DEFAULT_CACHE_BYTES) -> RangeCache | None:
    """Cache remote ranges in ``directory`` from now on (``None``: back to ``MF_CACHE_DIR`` or no cache)."""
    global _configured
    _configured = RangeCache(directory, max_bytes) if directory is not None else None
    return _configured


def default_cache() -> RangeCache | None:
    """The cache set by :func:`use_cache`, else one in ``MF_CACHE_DIR`` if that is set, else None."""
    global _from_env
    if _configured is not None:
        return _configured
    directory = os.environ.get("MF_CACHE_DIR")
    if not directory:
        return None
    if _from_env is None or _from_env[0] != directory:
        limit = int(os.environ.get("MF_CACHE_MAX_BYTES", DEFAULT_CACHE_BYTES))
        _from_env = (directory, RangeCache(directory, limit))
    return _from_env[1]
