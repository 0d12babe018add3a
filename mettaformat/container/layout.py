"""Fixed-size framing of a container: the preamble, the trailer tail, and alignment.

All integers are little-endian. The byte tables are normative in ``spec/FORMAT.md``.

Preamble (32 bytes, at offset 0)::

    0   8  magic            MFMT_MAGIC
    8   2  major            u16
    10  2  minor            u16
    12  4  flags            u32
    16  8  header_length    u64, bytes of msgpack that follow the preamble
    24  8  header_checksum  u64, xxh3-64 of those bytes

Trailer tail (last 32 bytes)::

    0   8  index_length     u64, bytes of msgpack index just before the tail
    8   8  index_checksum   u64, xxh3-64 of the index bytes
    16  8  file_length      u64, must equal the file size
    24  8  end magic        MFMT_END_MAGIC
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import xxhash

from mettaformat.constants import (
    FLAGS_KNOWN,
    FLAGS_REQUIRED_MASK,
    MAX_HEADER_SIZE,
    MAX_INDEX_SIZE,
    MFMT_END_MAGIC,
    MFMT_MAGIC,
    MFMT_VERSION_MAJOR,
    PREAMBLE_SIZE,
    READER_SUPPORTED_MAJORS,
    TRAILER_TAIL_SIZE,
)
from mettaformat.errors import (
    BadMagicError,
    IntegrityError,
    LayoutError,
    LimitExceededError,
    UnsupportedVersionError,
)

__all__ = ["Preamble", "TrailerTail", "align_offset", "checksum", "checksum_bytes"]

_PREAMBLE: Final = struct.Struct("<8sHHIQQ")
_TAIL: Final = struct.Struct("<QQQ8s")
assert _PREAMBLE.size == PREAMBLE_SIZE and _TAIL.size == TRAILER_TAIL_SIZE


def align_offset(offset: int, alignment: int) -> int:
    """The smallest multiple of ``alignment`` (a power of two) that is >= ``offset``."""
    return (offset + alignment - 1) & ~(alignment - 1)


def checksum(data: bytes | bytearray | memoryview) -> int:
    """xxh3-64 of ``data``: fast enough (about 10 GB/s) not to matter next to memcpy."""
    return xxhash.xxh3_64_intdigest(data)


def checksum_bytes(value: int) -> bytes:
    """A checksum as stored in the header: 8 bytes, little-endian (fixed width on purpose)."""
    return value.to_bytes(8, "little")


@dataclass(frozen=True, kw_only=True)
class Preamble:
    major: int
    minor: int
    flags: int
    header_length: int
    header_checksum: int

    def pack(self) -> bytes:
        return _PREAMBLE.pack(MFMT_MAGIC, self.major, self.minor, self.flags, self.header_length, self.header_checksum)

    @classmethod
    def unpack(cls, data: bytes, file_size: int) -> Preamble:
        """Parse and check the preamble of a file of ``file_size`` bytes.

        Raises:
            LayoutError: fewer than 32 bytes.
            BadMagicError: not a mettaformat file.
            UnsupportedVersionError: a major version or required flag this reader lacks.
            LimitExceededError: a header length over ``MAX_HEADER_SIZE`` or past the end of file.
        """
        if len(data) < PREAMBLE_SIZE:
            raise LayoutError(
                f"file too small: {len(data)} bytes, a container needs at least {PREAMBLE_SIZE}", region="preamble"
            )
        magic, major, minor, flags, header_length, header_checksum = _PREAMBLE.unpack_from(data)
        if magic != MFMT_MAGIC:
            raise BadMagicError(f"not a mettaformat file (magic {bytes(magic)!r})", region="preamble", offset=0)
        if major not in READER_SUPPORTED_MAJORS:
            raise UnsupportedVersionError(
                f"checkpoint format version {major}.{minor} not supported: this reader supports major "
                f"version(s) {', '.join(map(str, READER_SUPPORTED_MAJORS))}; upgrade mettaformat to read it",
                found=(major, minor),
                supported=READER_SUPPORTED_MAJORS,
                region="preamble",
                offset=8,
            )
        unknown_required = flags & FLAGS_REQUIRED_MASK & ~FLAGS_KNOWN
        if unknown_required:
            raise UnsupportedVersionError(
                f"file requires unknown feature flags {unknown_required:#x}; upgrade mettaformat to read it",
                found=(major, minor),
                supported=FLAGS_KNOWN,
                region="preamble",
                offset=12,
            )
        if header_length > MAX_HEADER_SIZE:
            raise LimitExceededError("header length", header_length, MAX_HEADER_SIZE, region="preamble", offset=16)
        if PREAMBLE_SIZE + header_length + TRAILER_TAIL_SIZE > file_size:
            raise LayoutError(
                f"header length {header_length} runs past the end of a {file_size}-byte file",
                region="preamble",
                offset=16,
            )
        return cls(major=major, minor=minor, flags=flags, header_length=header_length, header_checksum=header_checksum)

    @staticmethod
    def for_header(header: bytes, flags: int, minor: int) -> Preamble:
        return Preamble(
            major=MFMT_VERSION_MAJOR,
            minor=minor,
            flags=flags,
            header_length=len(header),
            header_checksum=checksum(header),
        )


@dataclass(frozen=True, kw_only=True)
class TrailerTail:
    index_length: int
    index_checksum: int
    file_length: int

    @property
    def index_offset(self) -> int:
        return self.file_length - TRAILER_TAIL_SIZE - self.index_length

    def pack(self) -> bytes:
        return _TAIL.pack(self.index_length, self.index_checksum, self.file_length, MFMT_END_MAGIC)

    @classmethod
    def unpack(cls, data: bytes, file_size: int) -> TrailerTail:
        """Parse the last 32 bytes of a file of ``file_size`` bytes.

        Raises:
            LayoutError: missing end magic or a file length that disagrees (truncated or extended file).
            LimitExceededError: an index length over ``MAX_INDEX_SIZE``.
        """
        offset = file_size - TRAILER_TAIL_SIZE
        if len(data) != TRAILER_TAIL_SIZE:
            raise LayoutError("file too small for a trailer", region="trailer", offset=max(offset, 0))
        index_length, index_checksum, file_length, end = _TAIL.unpack(data)
        if end != MFMT_END_MAGIC:
            raise LayoutError(
                "end magic missing: the file is truncated or was extended", region="trailer", offset=offset + 24
            )
        if file_length != file_size:
            raise LayoutError(
                f"trailer says the file has {file_length} bytes, it has {file_size}",
                region="trailer",
                offset=offset + 16,
            )
        if index_length > MAX_INDEX_SIZE:
            raise LimitExceededError(
                "trailer index length", index_length, MAX_INDEX_SIZE, region="trailer", offset=offset
            )
        if index_length > file_size - TRAILER_TAIL_SIZE - PREAMBLE_SIZE:
            raise LayoutError(
                f"trailer index length {index_length} runs past the start of the file", region="trailer", offset=offset
            )
        return cls(index_length=index_length, index_checksum=index_checksum, file_length=file_length)

    def verify_index(self, index: bytes) -> None:
        """Raises IntegrityError when the trailer index does not match its checksum."""
        if checksum(index) != self.index_checksum:
            raise IntegrityError("trailer index checksum mismatch", region="trailer index", offset=self.index_offset)
