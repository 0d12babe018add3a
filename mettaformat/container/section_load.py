"""Whole-section loads: every tensor of a section at once, on all cores.

Raw sections map zero-copy (checksums computed on all cores) or are read into one fresh buffer
with each chunk hashed as it lands; zstd sections decode every frame at once straight into the
destination tensors; delta sections rebuild their tensors from the base in parallel; tensors
for an accelerator go there without the whole model passing through host memory.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future, wait
from typing import TYPE_CHECKING, Final

import torch

from mettaformat._pool import pool_for, shared_pool
from mettaformat._torch import fresh_bytes, writable_bytes
from mettaformat.constants import PREAMBLE_SIZE
from mettaformat.container.chain import delta_names, saved_tensors
from mettaformat.container.device_load import load_to_device, off_host, transport_for
from mettaformat.container.header import SectionEntry, TensorEntry
from mettaformat.container.verify import hash_views
from mettaformat.dtypes import dtype_from_tag
from mettaformat.errors import LayoutError

if TYPE_CHECKING:
    from mettaformat.container.reader import LazyCheckpoint

__all__ = ["decode_all", "load_section", "read_copy", "run_tasks", "unmapped_ranges"]


def load_section(
    ckpt: LazyCheckpoint, section: str, device: str | torch.device, copy: bool | None
) -> dict[str, torch.Tensor]:
    """See :meth:`LazyCheckpoint.load_section` (the caller names the file in errors)."""
    src = ckpt._src
    copy = (ckpt.copy if copy is None else copy) or not src.mappable
    s = ckpt.header.section(section)
    if not src.mappable:  # one parallel fetch of what the structure checks and codecs slice
        src.prefetch(unmapped_ranges(ckpt))
    ckpt._verify_structure_once()
    if s is None:
        return {}
    target = torch.device(device)
    zero_copy = ckpt._readers[s.name].zero_copy
    deltas = delta_names(ckpt, s.name)
    if deltas:  # residuals and the base tensors they need decode together, then rebuild in place
        out = {name: t.to(target) for name, t in saved_tensors(ckpt, s).items()}
    elif off_host(target) and src.mappable:  # straight to the device, never the whole model in host memory
        out = load_to_device(ckpt, s, s.tensors, transport_for(target))
    elif not zero_copy:
        out = decode_all(ckpt, s)
    elif copy:
        out = read_copy(ckpt, s)
    else:
        out = _map_all(ckpt, s)
    if target.type != "cpu" and not src.mappable:  # remote: read to host memory, then move
        out = {k: v.to(target) for k, v in out.items()}
    return {name: out[s.aliases.get(name, name)] for name in s.order}


def _map_all(ckpt: LazyCheckpoint, s: SectionEntry) -> dict[str, torch.Tensor]:
    """Every raw tensor as a zero-copy view; checksums are computed on all cores at once."""
    source = ckpt._mapped()
    owner = ckpt._src.owner()
    reader = ckpt._readers[s.name]
    unchecked = ckpt._unchecked(s, s.tensors)
    views = [reader.view(source, e) for e in unchecked]
    ckpt._check_all(s, unchecked, hash_views(views), views)
    return {entry.name: ckpt._mapped_tensor(s, entry, owner) for entry in s.tensors}


def read_copy(
    ckpt: LazyCheckpoint, s: SectionEntry, entries: tuple[TensorEntry, ...] | None = None
) -> dict[str, torch.Tensor]:
    """Raw tensors read into one fresh buffer that they view (the whole data region, or just the
    span of ``entries``), so they do not depend on the file afterwards. Each chunk is hashed as
    soon as it is read, on all cores: the bytes come from memory once."""
    chosen = s.tensors if entries is None else entries
    start = min((e.begin for e in chosen), default=0)
    data_length = max((e.end for e in chosen), default=0) - start
    buffer = torch.empty(data_length, dtype=torch.uint8)
    offset = s.offset + s.stream_header_length + start
    unchecked = ckpt._unchecked(s, chosen)
    # spans must not overlap: tied names share one entry, so entries are distinct ranges
    spans = [(e.begin - start, e.end - start) for e in unchecked]
    done, digests = ckpt._src.read_and_hash(writable_bytes(buffer), offset, spans, hash_=bool(unchecked))
    if done < data_length:
        raise LayoutError(
            f"file ended {data_length - done} bytes early", region=f"section {s.name!r}", offset=offset + done
        )
    ckpt._check_all(s, unchecked, digests, [buffer[e.begin - start : e.end - start] for e in unchecked])
    out: dict[str, torch.Tensor] = {}
    for entry in chosen:
        part = buffer[entry.begin - start : entry.end - start]
        dtype = dtype_from_tag(entry.dtype)
        out[entry.name] = part.view(dtype).reshape(entry.shape) if entry.nbytes else torch.empty(
            entry.shape, dtype=dtype)
    return out


def decode_all(
    ckpt: LazyCheckpoint, s: SectionEntry, entries: list[TensorEntry] | None = None
) -> dict[str, torch.Tensor]:
    """Decode every frame of a compressed section (or of ``entries``) at once on all cores, straight
    into the destination tensors; checksums are verified here while workers decode later tensors."""
    source = ckpt._mapped()
    reader = ckpt._readers[s.name]
    out: dict[str, torch.Tensor] = {}
    chosen = s.tensors if entries is None else entries
    batches = _Batches(pool_for(sum(e.nbytes for e in chosen)))
    jobs = []
    for entry in chosen:
        buffer = fresh_bytes(entry.nbytes)
        tasks, digest = ckpt._decode_tasks(reader, source, s, entry, buffer)
        jobs.append((entry, buffer, digest, batches.add(tasks, entry.nbytes)))
    batches.flush()
    try:
        for entry, buffer, digest, (first, last) in jobs:
            for future in batches.submitted[first : last + 1]:
                future.result()
            if digest is not None:
                ckpt._check(entry, s, digest(), buffer)
            dtype = dtype_from_tag(entry.dtype)
            out[entry.name] = (
                buffer.view(dtype).reshape(entry.shape) if entry.nbytes else torch.empty(entry.shape, dtype=dtype)
            )
    except BaseException:
        _cancel_and_wait(batches.submitted)
        raise
    return out


#: Decoded bytes per pool job: the jobs of small tensors run together, because handing each to a worker
#: (a wake-up and a turn of the GIL) cost as much as decoding a 64 KiB tensor; a 2.3 MB policy loaded
#: a quarter faster on 2 cores.
BATCH_BYTES: Final = 1 << 20


class _Batches:
    """Decode jobs grouped, in order, into pool jobs of about ``BATCH_BYTES`` decoded bytes each."""

    def __init__(self, pool: Executor) -> None:
        self.pool = pool
        self.submitted: list[Future[None]] = []
        self.pending: list[Callable[[], None]] = []
        self.size = 0

    def add(self, tasks: list[Callable[[], None]], nbytes: int) -> tuple[int, int]:
        """Queue one tensor's ``tasks`` (``nbytes`` in all); returns the range of batches (indexes
        into ``submitted`` once flushed, inclusive) that hold them."""
        first = len(self.submitted)
        for task in tasks:
            self.pending.append(task)
            self.size += nbytes // len(tasks)
            if self.size >= BATCH_BYTES:
                self.flush()
        return first, len(self.submitted) if self.pending else len(self.submitted) - 1

    def flush(self) -> None:
        if self.pending:
            self.submitted.append(self.pool.submit(_run_in_order, self.pending))
            self.pending, self.size = [], 0


def _run_in_order(tasks: list[Callable[[], None]]) -> None:
    for task in tasks:
        task()


def unmapped_ranges(ckpt: LazyCheckpoint) -> list[tuple[int, int]]:
    """Everything after the header except raw tensor data (which is read straight into tensors)."""
    ranges, position = [], PREAMBLE_SIZE + ckpt.preamble.header_length
    for s in sorted(ckpt.header.sections, key=lambda s: s.offset):
        if ckpt._readers[s.name].zero_copy:
            ranges.append((position, s.offset + s.stream_header_length))
            position = s.end
    ranges.append((position, ckpt.file_size))
    return [(a, b) for a, b in ranges if b > a]


def run_tasks(tasks: list[Callable[[], None]]) -> None:
    """Run decode jobs, in parallel when a tensor spans several frames."""
    if len(tasks) < 2:
        for task in tasks:
            task()
        return
    futures = [shared_pool().submit(task) for task in tasks]
    try:
        for future in futures:
            future.result()
    except BaseException:
        _cancel_and_wait(futures)
        raise


def _cancel_and_wait(futures: list[Future[None]]) -> None:
    """After a failed decode: drop the jobs not started and wait for the running ones, which read
    the file's mapping. Raising earlier would let them touch it after the caller has moved on (a
    file truncated then kills the process with SIGBUS)."""
    for future in futures:
        future.cancel()
    wait(futures)
