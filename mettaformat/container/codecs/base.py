"""The codec contract: how a section's safetensors stream is written to and read from the file.

A codec writes a planned stream at a file offset and reports what the index must record
(length, per-tensor checksums, codec tables). On the read side it validates the index at
open time, then produces the bytes of one tensor, either as a zero-copy view of the mapped
file or by decoding into a caller-provided destination.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from mettaformat.container.header import SectionEntry, TensorEntry
from mettaformat.container.stream import StreamPlan

__all__ = ["Codec", "SectionReader", "WrittenStream", "pwrite_all", "pwritev_all"]


@dataclass
class WrittenStream:
    length: int
    checksums: dict[str, int]
    frames: bytes = b""
    configuration: dict[str, Any] = field(default_factory=dict)


class SectionReader(Protocol):
    """Read access to one validated section of an open file."""

    #: True when :meth:`view` returns zero-copy views of the mapped file.
    zero_copy: bool

    def stream_header(self, source: memoryview) -> bytes:
        """The section's safetensors header bytes (length prefix included)."""

    def view(self, source: memoryview, entry: TensorEntry) -> memoryview:
        """Zero-copy view of a tensor's stored bytes (only when ``zero_copy``)."""

    def decode_tasks(self, source: memoryview, entry: TensorEntry, out: torch.Tensor) -> list[Callable[[], None]]:
        """Independent jobs that together fill ``out`` (uint8, ``entry.nbytes`` long)."""

    def stored_end(self, entry: TensorEntry) -> int:
        """The file offset just past a tensor's stored bytes (lets repair skip what a cut file lacks)."""


class Codec(Protocol):
    """What a codec implements; ``spec/codecs/README.md`` is the contract in words.

    A codec is a (frozen) object holding its write-side parameters. Readers build one with no
    arguments: everything needed to decode must be in the file (the section's ``configuration``,
    ``frames`` and stream fields), never in the reader's parameters.
    """

    #: The name written to ``codec.name`` in the file and accepted by ``compression=``.
    name: ClassVar[str]
    #: Names of the filters the codec may apply, for documentation and ``inspect``.
    filters: ClassVar[tuple[str, ...]]

    def configuration(self) -> dict[str, Any]:
        """The parameters written to ``codec.configuration`` (plain msgpack values)."""

    @classmethod
    def from_configuration(cls, configuration: dict[str, Any]) -> Codec:
        """A writer-side instance from parameters (``{"level": ...}`` from ``save_file(level=...)``).

        Raises:
            ValueError, TypeError: parameters the codec does not accept.
        """

    def frame_table_size(self, plan: StreamPlan) -> int:
        """Exact byte length of the ``frames`` table :meth:`write` will return for ``plan`` (0 for none).

        The header reserves this space before any data is written.
        """

    def write(self, fd: int, offset: int, plan: StreamPlan, pool: Executor) -> WrittenStream:
        """Write ``plan`` at ``offset`` of ``fd``; return what the index records."""

    def open_section(self, section: SectionEntry) -> SectionReader:
        """Validate codec-specific index fields and return a reader.

        Raises:
            FormatError subclasses naming the section and frame.
        """


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """``os.pwrite`` until everything is written (Linux writes at most 2 GiB per call)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


#: Buffers per pwritev call (POSIX guarantees at least 16; Linux allows 1024).
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 16


def pwritev_all(fd: int, buffers: list[memoryview], offset: int, keep: object = None) -> None:
    """Write consecutive ``buffers`` at ``offset`` with as few system calls as possible.

    ``keep`` holds the objects that own the buffers' memory until the write is done.
    """
    if not hasattr(os, "pwritev"):
        for buf in buffers:
            pwrite_all(fd, buf, offset)
            offset += len(buf)
        return
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    first = 0
    while first < len(pending):
        written = os.pwritev(fd, pending[first : first + _IOV_MAX], offset)
        offset += written
        # skip what was written; a partial write leaves the rest of one buffer
        while first < len(pending) and written >= len(pending[first]):
            written -= len(pending[first])
            first += 1
        if written:
            pending[first] = pending[first][written:]
