"""The ``raw`` codec: the safetensors stream stored verbatim, read as zero-copy views.

Normative description: ``spec/codecs/raw.md``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import torch

from mettaformat._torch import contiguous_cpu, tensor_bytes
from mettaformat.container.codecs.base import WrittenStream, pwrite_all, pwritev_all
from mettaformat.container.header import SectionEntry, TensorEntry
from mettaformat.container.layout import checksum
from mettaformat.container.stream import StreamPlan
from mettaformat.errors import LayoutError

__all__ = ["RawCodec"]

#: Consecutive tensors are written with one pwritev once this many bytes are gathered.
_BATCH_BYTES: Final = 8 << 20
#: Bytes handed to the writer thread and not yet written (bounds the copies of non-contiguous tensors).
_MAX_IN_FLIGHT: Final = 256 << 20


@dataclass(frozen=True)
class RawCodec:
    name: ClassVar[str] = "raw"
    filters: ClassVar[tuple[str, ...]] = ()

    def configuration(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_configuration(cls, configuration: dict[str, Any]) -> RawCodec:
        """``raw`` has no parameters; a ``level`` asked of every codec by the writer is ignored."""
        unknown = set(configuration) - {"level"}
        if unknown:
            raise ValueError(f"raw takes no parameters, got {sorted(unknown)}")
        return cls()

    def frame_table_size(self, plan: StreamPlan) -> int:
        return 0

    def write(self, fd: int, offset: int, plan: StreamPlan, pool: Executor) -> WrittenStream:
        """Hash on this thread while a worker writes: tensors are gathered into large pwritev
        batches, since a thread handoff per small tensor cost more than the write itself."""
        pwrite_all(fd, plan.header, offset)
        data_start = offset + len(plan.header)
        checksums: dict[str, int] = {}
        in_flight: deque[tuple[Future[None], int]] = deque()
        flying = 0
        batch: list[memoryview] = []
        keep: list[Any] = []  # tensors whose memory the batch views (contiguous copies included)
        batch_start = batch_bytes = 0

        def flush() -> None:
            nonlocal batch, keep, batch_bytes, flying
            if batch:
                future = pool.submit(pwritev_all, fd, batch, data_start + batch_start, keep)
                in_flight.append((future, batch_bytes))
                flying += batch_bytes
            batch, keep, batch_bytes = [], [], 0
            while in_flight and (flying > _MAX_IN_FLIGHT or in_flight[0][0].done()):
                done, size = in_flight.popleft()
                done.result()
                flying -= size

        for p in plan.tensors:
            t = contiguous_cpu(p.tensor, p.name)  # a copy only when the tensor was not contiguous
            data = tensor_bytes(t)
            checksums[p.name] = checksum(data)
            if not batch:
                batch_start = p.begin
            batch.append(data)
            keep.append(t)
            batch_bytes += len(data)
            if batch_bytes >= _BATCH_BYTES:
                flush()
        flush()
        for future, _ in in_flight:
            future.result()
        return WrittenStream(length=plan.length, checksums=checksums)

    def open_section(self, section: SectionEntry) -> _RawSection:
        if section.length != section.stream_length:
            raise LayoutError(
                f"raw section length {section.length} differs from its stream length {section.stream_length}",
                region=f"section {section.name!r}",
            )
        if section.frames:
            raise LayoutError("raw section carries a frame table", region=f"section {section.name!r}")
        return _RawSection(section)


class _RawSection:
    zero_copy = True

    def __init__(self, section: SectionEntry) -> None:
        self.section = section
        self.data_start = section.offset + section.stream_header_length

    def stream_header(self, source: memoryview) -> bytes:
        return bytes(source[self.section.offset : self.data_start])

    def view(self, source: memoryview, entry: TensorEntry) -> memoryview:
        return source[self.data_start + entry.begin : self.data_start + entry.end]

    def stored_end(self, entry: TensorEntry) -> int:
        return self.data_start + entry.end

    def decode_tasks(self, source: memoryview, entry: TensorEntry, out: torch.Tensor) -> list[Callable[[], None]]:
        def copy() -> None:
            out.copy_(torch.frombuffer(self.view(source, entry), dtype=torch.uint8))

        return [copy] if entry.nbytes else []
