"""Checksum verification at memory speed.

Every tensor's xxh3-64 is checked on load. Hashing runs at about memory bandwidth on one core,
so a verified load would read the bytes twice (hash, then the user's first touch). Three things
keep that cost down:

- **Hashing on every core.** The binding releases the GIL for inputs above 64 KiB, so tensors
  are hashed on the shared pool, grouped into runs of about equal bytes (one tensor's hash
  cannot be split: xxh3 is a sequential hash).
- **Hashing fused with the copy or the decode.** ``mmap=False`` loads read the file in chunks
  small enough to stay in the CPU cache and hash each chunk right after it lands; zstd loads
  hash each frame as soon as it is decoded, in order. Each byte then comes from main memory once.
- **A memo of verified files.** A tensor verified once in this process is not hashed again while
  its file keeps the same device, inode, size, mtime and ctime; nor is the file's structure
  (padding, trailer index, embedded safetensors headers) checked again by a verified load. A
  file modified within the file system's timestamp granularity of being verified could keep its
  timestamps, so nothing is remembered for a file changed less than :data:`RACY_WINDOW_NS`
  before it was verified (the rule git uses for its index).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import wait
from typing import Final

import xxhash

from mettaformat._pool import shared_pool, usable_cores

__all__ = [
    "RACY_WINDOW_NS",
    "STRUCTURE",
    "FileIdentity",
    "OrderedHasher",
    "file_identity",
    "forget_verified",
    "hash_views",
    "is_verified",
    "mark_verified",
    "read_and_hash",
]

#: A file modified less than this before its verification is not remembered as verified.
RACY_WINDOW_NS: Final = 2_000_000_000
#: The memo's key for a file's whole structure (no section has an empty name).
STRUCTURE: Final = ("", "structure")
#: Below this many bytes in all, hashing on the calling thread beats a pool round trip.
_PARALLEL_MIN_BYTES: Final = 4 << 20
#: Chunk of a fused read-and-hash: small enough to be hashed while still in the CPU cache.
_FUSED_CHUNK: Final = 1 << 20
#: Files remembered; the memo is dropped wholesale beyond this (a bound, not an LRU).
_MEMO_LIMIT: Final = 4096

#: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)
FileIdentity = tuple[int, int, int, int, int]

_lock = threading.Lock()
_verified: dict[FileIdentity, set[tuple[str, str]]] = {}


def file_identity(st: os.stat_result) -> FileIdentity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def is_verified(identity: FileIdentity | None, key: tuple[str, str]) -> bool:
    """True when tensor ``key`` (section, name) of the file ``identity`` was verified in this process."""
    if identity is None:
        return False
    with _lock:
        done = _verified.get(identity)
        return done is not None and key in done


def mark_verified(identity: FileIdentity | None, keys: Sequence[tuple[str, str]]) -> None:
    """Remember that ``keys`` of the file ``identity`` matched their checksums (unless racy)."""
    if identity is None or not keys:
        return
    newest_change = max(identity[3], identity[4])
    if time.time_ns() - newest_change < RACY_WINDOW_NS:
        return
    with _lock:
        if identity not in _verified and len(_verified) >= _MEMO_LIMIT:
            _verified.clear()
        _verified.setdefault(identity, set()).update(keys)


def forget_verified() -> None:
    """Forget every verification of this process (the next verified load hashes everything again)."""
    with _lock:
        _verified.clear()


def _balanced_runs(sizes: Sequence[int], parts: int) -> list[range]:
    """Split indices into at most ``parts`` consecutive runs of about equal total size."""
    total = sum(sizes)
    runs: list[range] = []
    start, acc = 0, 0
    for i, n in enumerate(sizes):
        acc += n
        if len(runs) < parts - 1 and acc * parts >= total * (len(runs) + 1):
            runs.append(range(start, i + 1))
            start = i + 1
    if start < len(sizes):
        runs.append(range(start, len(sizes)))
    return runs


def hash_views(views: Sequence[memoryview]) -> list[int]:
    """xxh3-64 of each view, on every usable core when there is enough to hash."""
    sizes = [len(v) for v in views]
    workers = usable_cores()
    if workers < 2 or sum(sizes) < _PARALLEL_MIN_BYTES or len(views) < 2:
        return [xxhash.xxh3_64_intdigest(v) for v in views]

    def run(indices: range) -> list[int]:
        return [xxhash.xxh3_64_intdigest(views[i]) for i in indices]

    runs = _balanced_runs(sizes, workers)
    futures = [shared_pool().submit(run, r) for r in runs[1:]]
    try:
        digests = run(runs[0])  # this thread takes a share instead of waiting idle
        for future in futures:
            digests += future.result()
    finally:
        wait(futures)  # never return while a worker still reads the caller's buffers
    return digests


def _read_into(fd: int, target: memoryview, offset: int) -> int:
    """Fill ``target`` from ``fd`` at ``offset``; return how many bytes were read (short at EOF)."""
    done = 0
    while done < len(target):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [target[done:]], offset + done)
        else:  # platforms without preadv: one bounded copy at a time
            chunk = os.pread(fd, min(len(target) - done, 1 << 26), offset + done)
            target[done : done + len(chunk)] = chunk
            n = len(chunk)
        if n <= 0:
            break
        done += n
    return done


def read_and_hash(
    fd: int, target: memoryview, offset: int, spans: Sequence[tuple[int, int]], *, hash_: bool
) -> tuple[int, list[int]]:
    """Read ``len(target)`` bytes of ``fd`` at ``offset`` into ``target``; with ``hash_``, hash each
    ``(begin, end)`` span of ``target`` (sorted, non-overlapping) chunk by chunk as it arrives.

    The work is split into runs of whole spans, one per core. Returns the bytes read (short if
    the file ended early) and one digest per span (empty without ``hash_``).
    """
    if not hash_ or not spans:
        return _read_into(fd, target, offset), []
    sizes = [end - begin for begin, end in spans]
    workers = usable_cores() if len(target) >= _PARALLEL_MIN_BYTES else 1
    runs = _balanced_runs(sizes, max(1, workers))
    # each run also reads the gap before its first span (the last one, the tail too), so that
    # every byte of target is read once
    ends = [spans[r[-1]][1] for r in runs[:-1]] + [len(target)]
    bounds = [(ends[i - 1] if i else 0, ends[i]) for i in range(len(runs))]

    def run(i: int) -> tuple[int, list[int]]:
        low, high = bounds[i]
        got = 0
        digests: list[int] = []
        for j in runs[i]:
            begin, end = spans[j]
            gap = _read_into(fd, target[low:begin], offset + low) if begin > low else 0
            got += gap
            state = xxhash.xxh3_64()
            position = begin
            while position < end:
                stop = min(end, position + _FUSED_CHUNK)
                n = _read_into(fd, target[position:stop], offset + position)
                got += n
                if n < stop - position:
                    return got, digests
                state.update(target[position:stop])
                position = stop
            digests.append(state.intdigest())
            low = end
        if high > low:
            got += _read_into(fd, target[low:high], offset + low)
        return got, digests

    futures = [shared_pool().submit(run, i) for i in range(1, len(runs))]
    try:
        got, digests = run(0)
        for future in futures:
            n, more = future.result()
            got += n
            digests += more
    finally:
        wait(futures)  # on an error too: the workers write into the caller's buffer
    return got, digests


class OrderedHasher:
    """Hash a buffer that parallel jobs fill piece by piece, each piece as soon as it and every
    piece before it are done, so that the bytes are hashed while still in the CPU cache.

    Args:
        data: the buffer being filled.
        lengths: the byte lengths of its consecutive pieces (one per job).
    """

    def __init__(self, data: memoryview, lengths: Sequence[int]) -> None:
        self._data = data
        self._bounds = [0]
        for n in lengths:
            self._bounds.append(self._bounds[-1] + n)
        self._finished = [False] * len(lengths)
        self._next = 0
        self._busy = False
        self._lock = threading.Lock()
        self._state = xxhash.xxh3_64()

    def wrap(self, jobs: Sequence[Callable[[], None]]) -> list[Callable[[], None]]:
        """The jobs, each reporting its piece done when it returns."""
        if len(jobs) != len(self._finished):
            raise ValueError(f"{len(jobs)} jobs for {len(self._finished)} pieces")

        def job(i: int, fn: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                fn()
                self._done(i)

            return run

        return [job(i, fn) for i, fn in enumerate(jobs)]

    def _done(self, i: int) -> None:
        with self._lock:
            self._finished[i] = True
            if self._busy:
                return  # the thread hashing now will take this piece too
            self._busy = True
        while True:
            with self._lock:
                j = self._next
                if j >= len(self._finished) or not self._finished[j]:
                    self._busy = False
                    return
                self._next = j + 1
            self._state.update(self._data[self._bounds[j] : self._bounds[j + 1]])

    def intdigest(self) -> int:
        """The digest of the whole buffer (every job must have run)."""
        if self._next != len(self._finished):
            raise RuntimeError("not every piece was hashed")
        return self._state.intdigest()

