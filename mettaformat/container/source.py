"""Where a container's bytes come from: the one seam between the reader's rules and I/O.

The reader asks a byte source for regions (``read``), for a region copied into memory it owns
(``readinto``), and for a view of the whole file that the codecs slice (``view``). A local file
answers with ``pread``/``preadv`` and a private memory mapping; a remote object
(:class:`mettaformat.remote.source.RemoteSource`) answers with HTTP range requests. Everything
else -- checksums, layout rules, codecs -- stays in the reader and is the same for both.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from mettaformat._files import open_regular
from mettaformat.container.verify import FileIdentity, file_identity, read_and_hash
from mettaformat.errors import LayoutError, MettaFormatError

__all__ = ["ByteSource", "LocalSource", "open_source", "stored_ranges"]


class ByteSource(Protocol):
    #: a display name: the path or URI the user passed
    name: str
    #: total size in bytes, fixed when the source was opened
    size: int
    #: True when ``owner()`` can back zero-copy tensors (a memory mapping)
    mappable: bool

    def read(self, offset: int, length: int, region: str) -> bytes:
        """Exactly ``length`` bytes at ``offset``; :class:`LayoutError` naming ``region`` if the file is shorter."""

    def readinto(self, target: memoryview, offset: int, region: str) -> None:
        """Fill ``target`` with the bytes at ``offset``."""

    def has(self, offset: int, length: int) -> bool:
        """True when reading the region costs no further I/O request."""

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Hint: the ``(start, end)`` ranges will be sliced from :meth:`view` soon."""

    def holding(self, ranges: list[tuple[int, int]]) -> contextlib.AbstractContextManager[None]:
        """Within the block, :meth:`view` slices of the ranges cost no further request (they are
        fetched at once, neighbours together, and dropped at the end)."""

    def view(self) -> Any:
        """The whole file as a sliceable byte object (``view()[a:b]`` is a memoryview)."""

    def owner(self) -> Any:
        """The buffer that zero-copy tensors keep alive (only when ``mappable``)."""

    @property
    def fd(self) -> int:
        """The local file descriptor (-1 when closed or remote)."""

    def identity(self) -> FileIdentity | None:
        """Identifies this version of the file for the verified-tensor memo (None: never memoized)."""

    def read_and_hash(
        self, target: memoryview, offset: int, spans: Sequence[tuple[int, int]], *, hash_: bool
    ) -> tuple[int, list[int]]:
        """Read ``target`` at ``offset``; with ``hash_``, the checksum of each ``(begin, end)`` span of it."""

    def close(self) -> None: ...


def stored_ranges(reader: Any, entry: Any) -> list[tuple[int, int]]:
    """Where a section reader keeps one tensor's stored bytes (none known: empty)."""
    stored_range = getattr(reader, "stored_range", None)
    return [stored_range(entry)] if stored_range is not None else []


def open_source(path: str | os.PathLike[str] | ByteSource) -> ByteSource:
    """A local source for paths and ``file://`` URIs, a remote one for any other URI scheme."""
    from mettaformat.remote.uri import is_remote_uri, local_file

    if not isinstance(path, (str, os.PathLike)):
        return path  # already a source (load_any reuses the one it sniffed with)
    text = os.fspath(path)
    if is_remote_uri(text):
        from mettaformat.remote.source import RemoteSource

        return RemoteSource(text)
    return LocalSource(local_file(text))


class LocalSource:
    """A regular file read with ``pread`` and mapped copy-on-write on first :meth:`view`.

    The size is checked again before every mapped access, so a file truncated under us raises
    :class:`LayoutError` instead of killing the process with SIGBUS.
    """

    mappable = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = os.fspath(path)
        self.path = path if isinstance(path, Path) else Path(path)
        # Non-blocking open, regular files only: a FIFO, device or directory is refused at once.
        self._fd, st = open_regular(self.name)
        self.size = st.st_size
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None

    def read(self, offset: int, length: int, region: str) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise LayoutError(f"file ended after {len(data)} of {length} bytes", region=region, offset=offset)
        return data

    def readinto(self, target: memoryview, offset: int, region: str) -> None:
        done, length = 0, len(target)
        while done < length:
            if hasattr(os, "preadv"):
                n = os.preadv(self._fd, [target[done:]], offset + done)
            else:  # platforms without preadv: one bounded copy at a time
                chunk = os.pread(self._fd, min(length - done, 1 << 26), offset + done)
                target[done : done + len(chunk)] = chunk
                n = len(chunk)
            if n <= 0:
                raise LayoutError(f"file ended {length - done} bytes early", region=region, offset=offset + done)
            done += n

    def has(self, offset: int, length: int) -> bool:
        return True

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        pass  # the page cache and the mapping already read ahead

    def holding(self, ranges: list[tuple[int, int]]) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def view(self) -> memoryview:
        if self._fd < 0:
            raise MettaFormatError(f"{self.path} is closed")
        size = os.fstat(self._fd).st_size
        if size != self.size:
            raise LayoutError(f"file changed size from {self.size} to {size} while open", region="file")
        if self._view is None:
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
            self._view = memoryview(self._map)
        return self._view

    def owner(self) -> mmap.mmap:
        self.view()
        assert self._map is not None
        return self._map

    @property
    def fd(self) -> int:
        return self._fd

    def identity(self) -> FileIdentity | None:
        return file_identity(os.fstat(self._fd)) if self._fd >= 0 else None
    def read_and_hash(
        self, target: memoryview, offset: int, spans: Sequence[tuple[int, int]], *, hash_: bool
    ) -> tuple[int, list[int]]:
        return read_and_hash(self._fd, target, offset, spans, hash_=hash_)

    def close(self) -> None:
        """Release the file; tensors already returned keep the mapping alive."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._view = None
        self._map = None  # the mapping closes when the last tensor viewing it is freed

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
