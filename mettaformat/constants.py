"""Format constants and the named limits every reader enforces before it allocates.

The normative values live in ``spec/FORMAT.md``; ``tests/test_spec.py`` checks that the two agree.
"""

from __future__ import annotations

from typing import Final, Literal

# -- identity -----------------------------------------------------------------------------------
#: PNG-style magic: a high-bit byte catches 7-bit transfers, CR LF catches newline translation,
#: 0x1A stops ``type`` on DOS, and the final LF catches LF -> CR LF damage.
MFMT_MAGIC: Final = b"\x89MFT\r\n\x1a\n"
#: The last eight bytes of every file.
MFMT_END_MAGIC: Final = b"MFTEND\r\n"

#: ``checkpoint_format_version`` continues Metta's legacy numbering: 1 (PolicyRecord pickle),
#: 2 (the ``checkpoint_format_version: 2`` dict), 3 (this container).
MFMT_VERSION_MAJOR: Final = 3
MFMT_VERSION_MINOR: Final = 4
#: Major versions this reader opens. A newer minor of a supported major opens with a warning.
READER_SUPPORTED_MAJORS: Final = (3,)

#: Preamble flag bits. Unknown bits in the low 16 ("required") are fatal; unknown bits in the
#: high 16 ("optional") are ignored.
FLAG_HAS_TRAILER: Final = 1 << 0
FLAGS_REQUIRED_MASK: Final = 0x0000FFFF
FLAGS_KNOWN: Final = FLAG_HAS_TRAILER

PREAMBLE_SIZE: Final = 32
TRAILER_TAIL_SIZE: Final = 32

# -- layout -------------------------------------------------------------------------------------
#: Sections start on page boundaries so that a section can be mapped on its own.
MFMT_DEFAULT_ALIGNMENT: Final = 4096
#: The safetensors data region inside a section starts on this boundary (header padded with spaces).
STREAM_DATA_ALIGNMENT: Final = 64

# -- checksums ----------------------------------------------------------------------------------
ChecksumName = Literal["xxh3-64"]
CHECKSUM_NAMES: Final = ("xxh3-64",)
CHECKSUM_SIZE: Final = 8

# -- codecs -------------------------------------------------------------------------------------
#: The built-in codecs: the same word in ``compression=`` and in the file's ``codec.name``.
CodecName = Literal["raw", "zstd"]
CODEC_NAMES: Final = ("raw", "zstd")
#: What ``compression=`` accepts by name (a codec object is accepted too; ``"none"`` is a deprecated
#: spelling of ``"raw"``).
Compression = CodecName
#: Raw bytes per zstd frame written by default; large tensors are cut into frames this size.
ZSTD_DEFAULT_FRAME_SIZE: Final = 4 << 20
#: Level 1 is ``"fast"``: byte planes entropy-coded or stored (see ``container/codecs/planes.py``).
ZSTD_DEFAULT_LEVEL: Final = 1
#: What ``convert`` writes (here, not in the converter, so the CLI's parser needs no torch).
CONVERT_TARGETS: Final = ("mfmt", "v1", "v2", "v2-full", "pt", "safetensors", "dcp")

# -- limits (checked before anything is allocated) ----------------------------------------------
#: msgpack header size. safetensors uses 100 MB for its JSON header; ours carries more (trees).
MAX_HEADER_SIZE: Final = 256 << 20
#: Trailer index size (a copy of the section index, which is much smaller than the header).
MAX_INDEX_SIZE: Final = 64 << 20
#: Nesting depth of an object tree, in Python containers (each can take up to three msgpack levels,
#: which stays under msgpack's own limit of 1024).
MAX_TREE_DEPTH: Final = 100
MAX_SECTIONS: Final = 64
MAX_TENSORS_PER_SECTION: Final = 1_000_000
MAX_RANK: Final = 64
MAX_NAME_BYTES: Final = 4096
#: The embedded safetensors JSON header.
MAX_STREAM_HEADER_SIZE: Final = 100_000_000
#: Raw bytes in one zstd frame; bounds every single decompression allocation.
MAX_FRAME_RAW_SIZE: Final = 64 << 20
#: zstd window a decoder accepts (frames never need more than their own size).
MAX_ZSTD_WINDOW: Final = MAX_FRAME_RAW_SIZE
#: Largest dimension product accepted for one tensor (2**62 bytes is far beyond any real file).
MAX_TENSOR_BYTES: Final = 1 << 62
#: Bases a delta checkpoint stands on (bases of bases included): bounds the files one open touches.
MAX_CHAIN_DEPTH: Final = 16

#: Reserved tensor names (safetensors' metadata key, and our internal namespace).
RESERVED_NAMES: Final = frozenset({"__metadata__"})
