"""Whole-file structure check: what opening a container does not read.

Opening checks the preamble, the header and the trailer tail; a verified load also checks that
padding is zero, that the trailer index matches the header's, and that each section's embedded
safetensors header matches its checksum and the tensor index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mettaformat.constants import PREAMBLE_SIZE
from mettaformat.container.header import parse_index
from mettaformat.container.layout import checksum
from mettaformat.container.stream import check_stream_header
from mettaformat.errors import IntegrityError

if TYPE_CHECKING:
    from mettaformat.container.reader import LazyCheckpoint

__all__ = ["check_structure"]


def check_structure(ckpt: LazyCheckpoint) -> None:
    """See :meth:`LazyCheckpoint.verify_structure` (the caller names the file in errors)."""
    source = ckpt._mapped()
    header_end = PREAMBLE_SIZE + ckpt.preamble.header_length
    gaps = []
    position = header_end
    for s in sorted(ckpt.header.sections, key=lambda s: s.offset):
        gaps.append((position, s.offset))
        position = s.end
    tail = ckpt.tail
    gaps.append((position, tail.index_offset))
    for start, end in gaps:
        if any(source[start:end]):
            raise IntegrityError("non-zero bytes in padding", region="padding", offset=start)
    index = bytes(source[tail.index_offset : tail.index_offset + tail.index_length])
    tail.verify_index(index)
    if parse_index(index).index_key() != ckpt.header.index_key():
        raise IntegrityError(
            "trailer index differs from the header's", region="trailer index", offset=tail.index_offset
        )
    for s in ckpt.header.sections:
        stream_header = ckpt.section_reader(s.name).stream_header(source)
        if checksum(stream_header) != s.stream_header_checksum:
            raise IntegrityError(
                "safetensors header checksum mismatch", region=f"section {s.name!r}", offset=s.offset
            )
        check_stream_header(s, stream_header)
