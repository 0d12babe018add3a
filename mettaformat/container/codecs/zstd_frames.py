"""zstd frames as the container stores them: checked before decoding, built without zstd when stored.

Nothing in a frame is trusted over the checksummed index: before decompressing, the frame
header and block headers are walked to check the magic, the declared content size, the window
size, the absence of a dictionary, a content checksum, and the exact frame length.

A byte plane that does not compress (the low mantissa bytes of trained weights) is written as a
frame of raw blocks built here, which costs a copy and an xxh64 instead of a compression attempt;
any zstd decoder reads it like any other frame.

Where the extension is built and libzstd loads, a whole chunk (its frames walked by the same
rules, decompressed, its planes joined) is one compiled call without the GIL (``_chunk.c``,
:func:`chunk_decoder`); the functions here are the rule it follows and the path everywhere else.
"""

from __future__ import annotations

import struct
import threading
from types import ModuleType
from typing import Any, Final

import xxhash
import zstandard

from mettaformat.constants import MAX_ZSTD_WINDOW
from mettaformat.errors import CodecError

__all__ = [
    "MIN_FRAME",
    "check_stored",
    "chunk_decoder",
    "compressor",
    "decompressor",
    "frame_length",
    "min_frame_length",
    "stored_frame",
    "walk_frame",
]

_ZSTD_MAGIC: Final = 0xFD2FB528
#: Smallest possible frame: magic, descriptor, 1-byte content size, one block header, checksum.
MIN_FRAME: Final = 4 + 1 + 1 + 3 + 4
_BLOCK_MAX: Final = 128 << 10
#: Frame header of a stored frame: single segment, 8-byte content size, content checksum.
_STORED_DESCRIPTOR: Final = (3 << 6) | (1 << 5) | (1 << 2)
_local = threading.local()

_kernel: ModuleType | None
try:  # the compiled chunk decoder (_chunk.c, built by setup.py)
    from mettaformat.container.codecs import _planes as _kernel
except ImportError:  # pragma: no cover - a build without a C compiler
    _kernel = None


def chunk_decoder() -> Any | None:
    """This thread's context for the compiled chunk decoder, or None where it is not available
    (no extension, or no libzstd 1.4+ to load); call it as ``decode_chunk(context, source, base, table,
    first, count, out, scratch, float_bits, MAX_ZSTD_WINDOW)``, ``source`` holding the file from offset
    ``base`` on."""
    if _kernel is None:
        return None
    context = getattr(_local, "chunk", False)
    if context is False:
        context = _local.chunk = _kernel.decoder() if _kernel.zstd_version() else None
    return context


def decode_chunk(*args: Any) -> tuple[int, str, bool] | None:
    """The compiled decoder's call (see :func:`chunk_decoder`): None, or the first refused frame of
    the chunk, why, and whether libzstd (rather than a rule of :func:`walk_frame`) refused it."""
    assert _kernel is not None
    result: tuple[int, str, bool] | None = _kernel.decode_chunk(*args)
    return result


def decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (a context is not safe to share between threads)."""
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
    return d


def compressor(key: tuple[int, ...]) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``key``: ``(level,)`` or the fields of ``ZstdCompressionParameters``
    as ``(strategy, window_log, hash_log, chain_log, search_log, min_match, target_length)``."""
    cache: dict[tuple[int, ...], zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    c = cache.get(key)
    if c is None:
        if len(key) == 1:
            c = zstandard.ZstdCompressor(level=key[0], write_checksum=True, write_content_size=True)
        else:
            strategy, window_log, hash_log, chain_log, search_log, min_match, target_length = key
            params = zstandard.ZstdCompressionParameters(
                strategy=strategy, window_log=window_log, hash_log=hash_log, chain_log=chain_log,
                search_log=search_log, min_match=min_match, target_length=target_length,
                write_checksum=1, write_content_size=1,
            )
            c = zstandard.ZstdCompressor(compression_params=params)
        cache[key] = c
    return c


def stored_frame(data: bytes | memoryview) -> bytes:
    """A valid zstd frame of raw blocks holding ``data`` (non-empty) verbatim."""
    view = memoryview(data).cast("B")
    n = len(view)
    parts: list[bytes | memoryview] = [struct.pack("<IBQ", _ZSTD_MAGIC, _STORED_DESCRIPTOR, n)]
    for start in range(0, n, _BLOCK_MAX):
        size = min(_BLOCK_MAX, n - start)
        last = 1 if start + size >= n else 0
        parts.append((size << 3 | last).to_bytes(3, "little"))
        parts.append(view[start : start + size])
    parts.append(struct.pack("<I", xxhash.xxh64_intdigest(view) & 0xFFFFFFFF))
    return b"".join(parts)


def min_frame_length(raw_length: int) -> int:
    """The shortest frame that can decode to ``raw_length`` (> 0) bytes with a content checksum.

    Magic, descriptor, a 1-byte content size and the checksum take 10 bytes; a block yields at
    most 128 KiB and takes at least 4 bytes (3-byte header, 1 byte of RLE payload). This bounds
    the compression ratio of an accepted frame by about 32768.
    """
    return 4 + 1 + 1 + 4 + 4 * -(-raw_length // _BLOCK_MAX)


def walk_frame(data: memoryview, expected_size: int, region: str) -> tuple[int, list[memoryview] | None]:
    """Walk a zstd frame's header and blocks: its total length and, when every block is raw (a
    stored frame), the blocks' payloads, which are its content.

    Raises:
        CodecError: not a zstd frame, a dictionary or an oversized window is required, no
            content checksum, a content size that differs from ``expected_size``, or a frame
            that runs past ``data``.
    """
    n = len(data)
    if n < MIN_FRAME or int.from_bytes(data[:4], "little") != _ZSTD_MAGIC:
        raise CodecError("not a zstd frame (bad magic)", region=region)
    fhd = data[4]
    fcs_flag, single_segment, reserved, has_checksum, dict_flag = (
        fhd >> 6,
        (fhd >> 5) & 1,
        (fhd >> 3) & 1,
        (fhd >> 2) & 1,
        fhd & 3,
    )
    if reserved:
        raise CodecError("zstd frame header has the reserved bit set", region=region)
    if dict_flag:
        raise CodecError("zstd frame requires a dictionary", region=region)
    if not has_checksum:
        raise CodecError("zstd frame has no content checksum", region=region)
    pos = 5
    if not single_segment:
        wd = data[pos]
        exponent, mantissa = wd >> 3, wd & 7
        base = 1 << (10 + exponent)
        if base + (base >> 3) * mantissa > MAX_ZSTD_WINDOW:
            raise CodecError(f"zstd window above the {MAX_ZSTD_WINDOW}-byte limit", region=region)
        pos += 1
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if fcs_size == 0:
        raise CodecError("zstd frame does not declare its content size", region=region)
    content = int.from_bytes(data[pos : pos + fcs_size], "little") + (256 if fcs_size == 2 else 0)
    if content != expected_size:
        raise CodecError(f"zstd frame declares {content} bytes, the index {expected_size}", region=region)
    pos += fcs_size
    raw: list[memoryview] | None = []
    while True:
        if pos + 3 > n:
            raise CodecError("zstd frame truncated in a block header", region=region)
        block = int.from_bytes(data[pos : pos + 3], "little")
        last, kind, size = block & 1, (block >> 1) & 3, block >> 3
        if kind == 3 or size > _BLOCK_MAX:
            raise CodecError("invalid zstd block header", region=region)
        if kind == 0 and raw is not None:
            raw.append(data[pos + 3 : pos + 3 + size])
        elif kind:
            raw = None
        pos += 3 + (1 if kind == 1 else size)
        if last:
            break
    pos += 4  # content checksum
    if pos > n:
        raise CodecError("zstd frame truncated", region=region)
    return pos, raw


def frame_length(data: memoryview, expected_size: int, region: str) -> int:
    """The total length of the zstd frame at the start of ``data``; raises as :func:`walk_frame`."""
    return walk_frame(data, expected_size, region)[0]


def check_stored(
    frame: memoryview, pieces: list[memoryview], expected_size: int, region: str, *, content_checksum: bool = True
) -> None:
    """Check the raw blocks ``pieces`` of ``frame`` (from :func:`walk_frame`) as a zstd decoder would:
    they hold ``expected_size`` bytes and (if ``content_checksum``) match the frame's content checksum.

    Raises:
        CodecError: naming which check failed.
    """
    got = sum(len(p) for p in pieces)
    if got != expected_size:
        raise CodecError(f"frame decoded to {got} bytes, expected {expected_size}", region=region)
    if not content_checksum:
        return
    digest = xxhash.xxh64()
    for piece in pieces:
        digest.update(piece)
    if digest.intdigest() & 0xFFFFFFFF != int.from_bytes(frame[-4:], "little"):
        raise CodecError("zstd: content checksum mismatch", region=region)
