"""The ``raw`` codec: the safetensors stream stored verbatim, read as zero-copy views.

Normative description: ``spec/codecs/raw.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import ClassVar

import torch

from mettaformat._torch import contiguous_cpu, tensor_bytes
from mettaformat.container.codecs.base import WrittenStream, pwrite_all
from mettaformat.container.header import SectionEntry, TensorEntry
from mettaformat.container.layout import checksum
from mettaformat.container.stream import StreamPlan
from mettaformat.errors import LayoutError

__all__ = ["RawCodec"]


@dataclass(frozen=True)
class RawCodec:
    name: ClassVar[str] = "raw"

    def write(self, fd: int, offset: int, plan: StreamPlan, pool: Executor) -> WrittenStream:
        pwrite_all(fd, plan.header, offset)
        data_start = offset + len(plan.header)
        checksums: dict[str, int] = {}
        for p in plan.tensors:
            t = contiguous_cpu(p.tensor, p.name)  # a copy only when the tensor was not contiguous
            data = tensor_bytes(t)
            # The write runs on a worker (it releases the GIL) while this thread hashes.
            written = pool.submit(pwrite_all, fd, data, data_start + p.begin)
            checksums[p.name] = checksum(data)
            written.result()
            del t, data
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

    def decode_tasks(self, source: memoryview, entry: TensorEntry, out: torch.Tensor) -> list[Callable[[], None]]:
        def copy() -> None:
            out.copy_(torch.frombuffer(self.view(source, entry), dtype=torch.uint8))

        return [copy] if entry.nbytes else []
