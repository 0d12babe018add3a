"""A remote object as a byte source for the container reader: range requests, pinned to one version.

Opening costs one metadata request (size and ETag) and one range request sized for a typical
header (``FIRST_READ``); the reader asks for more only when the header is longer. After that:

- one tensor: its own byte range (raw) or all its frames in one range (zstd), straight into
  the tensor or held while they decode;
- a whole section: the ranges split into ``PIECE``-sized requests, ``IN_FLIGHT`` at a time, each
  written into its place in the destination (neighbouring ranges closer than ``MAX_GAP`` are
  coalesced into one request stream);
- the structure checks (padding, trailer index, stream headers): one parallel prefetch.

Ranges are served from an optional local :class:`RangeCache` keyed by URI + ETag.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from mettaformat.container.layout import checksum
from mettaformat.errors import LayoutError
from mettaformat.remote.cache import RangeCache, default_cache
from mettaformat.remote.transport import ObjectVersion, fetch_range, stat_object
from mettaformat.remote.uri import filesystem

__all__ = ["FIRST_READ", "IN_FLIGHT", "PIECE", "RemoteSource"]

#: The first read at open: preamble and header of typical checkpoints (hundreds of tensors).
FIRST_READ: Final = 256 << 10
#: Size of one range request of a large read.
PIECE: Final = 8 << 20
#: Range requests in flight at once.
IN_FLIGHT: Final = 16
#: Ranges closer than this are fetched as one (the gap costs less than a request).
MAX_GAP: Final = 256 << 10

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _fetch_pool() -> ThreadPoolExecutor:
    """Threads that wait on requests (the transfers themselves run on fsspec's event loop)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="mettaformat-fetch")
        return _pool


def coalesce(ranges: list[tuple[int, int]], max_gap: int = MAX_GAP) -> list[tuple[int, int]]:
    """Sorted ``(start, end)`` ranges with neighbours closer than ``max_gap`` merged."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start - out[-1][1] <= max_gap:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


class RemoteSource:
    """The bytes of one version of a remote object, read by range.

    Args:
        uri: ``s3://bucket/key``, ``https://host/path``...
        size, etag: the object's size and ETag when already known (from a listing): opening
            then costs only the first range request.
        cache: a :class:`RangeCache`; default: :func:`default_cache` (``MF_CACHE_DIR``).
        first_read: bytes read at open (the header of most checkpoints fits ``FIRST_READ``).

    Raises:
        RemoteError subclasses naming the URI.
    """

    mappable = False

    def __init__(
        self,
        uri: str,
        *,
        size: int | None = None,
        etag: str | None = None,
        cache: RangeCache | None = None,
        first_read: int = FIRST_READ,
    ) -> None:
        self.name = uri
        self.fs, self.fs_path = filesystem(uri)
        self.version = stat_object(self.fs, self.fs_path, uri) if size is None else ObjectVersion(size, etag)
        self.size = self.version.size
        self.cache = cache if cache is not None else default_cache()
        #: requests sent and bytes received by this source (the cache's hits excluded)
        self.requests = self.bytes_fetched = 0
        self._stats_lock = threading.Lock()
        # Held regions: sorted starts and their bytes, replaced whole on change (decoding
        # threads read them while another thread may hold or drop a region).
        self._regions: tuple[list[int], list[bytes | bytearray]] = ([], [])
        self._regions_lock = threading.Lock()
        first = min(self.size, first_read)
        if first:
            self._hold(0, self.fetch(0, first))

    # -- requests -----------------------------------------------------------------------------
    def fetch(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``: from the cache, else one pinned range request (retried)."""
        cache, etag = self.cache, self.version.etag
        if cache is not None and etag is not None:
            hit = cache.get(self.name, etag, start, end)
            if hit is not None:
                return hit
        data = fetch_range(self.fs, self.fs_path, self.name, start, end, self.version)
        with self._stats_lock:
            self.requests += 1
            self.bytes_fetched += len(data)
        if cache is not None and etag is not None:
            cache.put(self.name, etag, start, end, data)
        return data

    def _fetch_into(self, target: memoryview, offset: int) -> None:
        """Fill ``target`` with the bytes at ``offset``: ``PIECE``-sized requests in parallel."""
        length = len(target)
        if length <= PIECE:
            target[:] = self.fetch(offset, offset + length)
            return

        def piece(p: int) -> None:
            end = min(p + PIECE, length)
            target[p:end] = self.fetch(offset + p, offset + end)

        futures = [_fetch_pool().submit(piece, p) for p in range(0, length, PIECE)]
        try:
            for f in futures:
                f.result()
        finally:
            for f in futures:  # on a failure, send no further requests
                f.cancel()

    # -- held regions (the first read, prefetches, and what a block is holding) ------------------
    def _hold(self, start: int, data: bytes | bytearray) -> None:
        with self._regions_lock:
            starts, held = list(self._regions[0]), list(self._regions[1])
            i = bisect.bisect_left(starts, start)
            starts.insert(i, start)
            held.insert(i, data)
            self._regions = (starts, held)

    def _drop(self, data: bytes | bytearray) -> None:
        with self._regions_lock:
            starts, held = self._regions
            keep = [i for i, h in enumerate(held) if h is not data]
            self._regions = ([starts[i] for i in keep], [held[i] for i in keep])

    def _find(self, start: int, end: int) -> memoryview | None:
        starts, held = self._regions
        i = bisect.bisect_right(starts, start) - 1
        if i >= 0 and end <= starts[i] + len(held[i]):
            base = starts[i]
            return memoryview(held[i])[start - base : end - base]
        return None

    def _check_bounds(self, offset: int, length: int, region: str) -> None:
        if offset < 0 or offset + length > self.size:
            raise LayoutError(
                f"object ended after {max(0, self.size - offset)} of {length} bytes", region=region, offset=offset
            )

    # -- the byte-source interface --------------------------------------------------------------
    def read(self, offset: int, length: int, region: str) -> bytes:
        self._check_bounds(offset, length, region)
        held = self._find(offset, offset + length)
        return bytes(held) if held is not None else self.fetch(offset, offset + length)

    def readinto(self, target: memoryview, offset: int, region: str) -> None:
        self._check_bounds(offset, len(target), region)
        held = self._find(offset, offset + len(target))
        if held is not None:
            target[:] = held
            return
        starts, held_data = self._regions
        i = bisect.bisect_right(starts, offset) - 1  # a held prefix (the first read) is not fetched again
        done = max(0, starts[i] + len(held_data[i]) - offset) if i >= 0 else 0
        prefix = self._find(offset, offset + done) if done else None
        if prefix is not None:
            target[:done] = prefix
        self._fetch_into(target[done:], offset + done)

    def has(self, offset: int, length: int) -> bool:
        return self._find(offset, offset + length) is not None

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        for start, end in coalesce(ranges):
            if self._find(start, end) is None:
                buffer = bytearray(end - start)
                self._fetch_into(memoryview(buffer), start)
                self._hold(start, buffer)

    @contextlib.contextmanager
    def holding(self, ranges: list[tuple[int, int]]) -> Iterator[None]:
        fetched = []
        try:
            for start, end in coalesce(ranges):
                if self._find(start, end) is None:
                    buffer = bytearray(end - start)
                    self._fetch_into(memoryview(buffer), start)
                    self._hold(start, buffer)
                    fetched.append(buffer)
            yield
        finally:
            for buffer in fetched:
                self._drop(buffer)

    def view(self) -> _SparseView:
        return _SparseView(self)

    def owner(self) -> Any:
        raise TypeError("a remote object cannot be mapped")

    fd = -1  # no local file

    def identity(self) -> None:
        return None  # tensors of a remote object are verified on every read

    def read_and_hash(
        self, target: memoryview, offset: int, spans: Sequence[tuple[int, int]], *, hash_: bool
    ) -> tuple[int, list[int]]:
        self.readinto(target, offset, "data")
        return len(target), [checksum(target[b:e]) for b, e in spans] if hash_ else []

    def close(self) -> None:
        with self._regions_lock:
            self._regions = ([], [])


class _SparseView:
    """What the codecs slice: ``view[a:b]`` is served from held regions, else fetched (not kept)."""

    def __init__(self, source: RemoteSource) -> None:
        self._source = source

    def __len__(self) -> int:
        return self._source.size

    def __getitem__(self, key: slice) -> memoryview:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("remote objects are sliced by contiguous ranges only")
        start, end, _ = key.indices(self._source.size)
        end = max(start, end)
        held = self._source._find(start, end)
        if held is not None:
            return held
        return memoryview(self._source.fetch(start, end)) if end > start else memoryview(b"")
