"""The ``zstd`` codec: the stream cut into independent zstd frames, each tensor split into byte planes.

Frame 0 holds the safetensors header; each tensor then has frames for chunks of at most
``frame_size`` raw bytes. A chunk of a multi-byte dtype is split into byte planes (for floats the
sign leaves the exponent plane, see ``planes.py``), one frame per plane, each coded as measured
best; tiny tensors and one-byte dtypes take one frame per chunk. The frame table (``frames``, 16 bytes per frame: u64
compressed length, u32 raw length, u32 filter) lets one tensor decode without touching the
others and lets a full load decode every chunk in parallel straight into its destination.
Normative description: ``spec/codecs/zstd.md``.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import numpy as np
import torch
import zstandard

from mettaformat._pool import usable_cores
from mettaformat._torch import contiguous_cpu, tensor_bytes, writable_bytes
from mettaformat.constants import MAX_FRAME_RAW_SIZE, MAX_ZSTD_WINDOW, ZSTD_DEFAULT_FRAME_SIZE, ZSTD_DEFAULT_LEVEL
from mettaformat.container.codecs.base import WrittenStream, pwrite_all
from mettaformat.container.codecs.planes import (
    FLOAT_TAGS,
    coders_for,
    encode_plane,
    join_planes,
    scratch,
    split_planes,
)
from mettaformat.container.codecs.shuffle import unshuffle
from mettaformat.container.codecs.zstd_frames import (
    MIN_FRAME,
    check_stored,
    chunk_decoder,
    decode_chunk,
    decompressor,
    min_frame_length,
    walk_frame,
)
from mettaformat.container.header import SectionEntry, TensorEntry
from mettaformat.container.layout import checksum
from mettaformat.container.stream import StreamPlan
from mettaformat.dtypes import itemsize
from mettaformat.errors import CodecError, LayoutError, WriteError

__all__ = ["FILTER_NONE", "FILTER_PLANES", "FILTER_FLOAT_PLANES", "FILTER_SHUFFLE", "ZstdCodec", "ZstdSection"]

FILTER_NONE: Final = 0
FILTER_SHUFFLE: Final = 1
FILTER_FLOAT_PLANES: Final = 2
FILTER_PLANES: Final = 3
_PLANE_FILTERS: Final = (FILTER_FLOAT_PLANES, FILTER_PLANES)
_FRAME: Final = struct.Struct("<QII")
#: Tensors smaller than this are one unfiltered frame per chunk (planes would cost more in frame overhead).
_PLANES_MIN_BYTES: Final = 4096


def _tensor_filter(dtype: str, nbytes: int) -> int:
    width = itemsize(dtype)
    if width == 1 or nbytes < _PLANES_MIN_BYTES:
        return FILTER_NONE
    return FILTER_FLOAT_PLANES if dtype in FLOAT_TAGS else FILTER_PLANES


@dataclass(frozen=True)
class ZstdCodec:
    """zstd frames per byte plane. ``level``: ``"fast"`` (default), ``"max"``, or a zstd level -7..22
    (see ``coders_for`` in ``planes.py`` and ``docs/guide.md``); ``frame_size``: raw bytes per chunk."""

    name: ClassVar[str] = "zstd"
    filters: ClassVar[tuple[str, ...]] = ("none", "shuffle", "float-planes", "planes")
    level: int | str = ZSTD_DEFAULT_LEVEL
    frame_size: int = ZSTD_DEFAULT_FRAME_SIZE

    def __post_init__(self) -> None:
        coders_for(self.level)  # raises WriteError for a level that means nothing
        if isinstance(self.frame_size, bool) or not isinstance(self.frame_size, int) or not (
            8 <= self.frame_size <= MAX_FRAME_RAW_SIZE
        ):
            raise WriteError(f"zstd frame_size {self.frame_size!r} is outside 8..{MAX_FRAME_RAW_SIZE}")

    def configuration(self) -> dict[str, Any]:
        return {"level": self.level, "frame_size": self.frame_size}

    @classmethod
    def from_configuration(cls, configuration: dict[str, Any]) -> ZstdCodec:
        return cls(**{k: configuration[k] for k in ("level", "frame_size") if k in configuration})

    def _step(self, width: int) -> int:
        return max(width, self.frame_size // width * width)

    def frame_table_size(self, plan: StreamPlan) -> int:
        if len(plan.header) > MAX_FRAME_RAW_SIZE:
            # frame 0 holds the whole safetensors header; readers cap every frame at this size
            raise WriteError(
                f"{len(plan.tensors)} tensors make a {len(plan.header)}-byte safetensors header, more than "
                f"a zstd frame may hold ({MAX_FRAME_RAW_SIZE}); save this section uncompressed"
            )
        count = 1  # the safetensors header frame
        for p in plan.tensors:
            width, nbytes = itemsize(p.dtype), p.end - p.begin
            chunks = -(-nbytes // self._step(width))
            count += chunks * (width if _tensor_filter(p.dtype, nbytes) in _PLANE_FILTERS else 1)
        return _FRAME.size * count

    def write(self, fd: int, offset: int, plan: StreamPlan, pool: Executor) -> WrittenStream:
        frames: list[tuple[int, int, int]] = []
        pending: deque[tuple[Future[list[bytes]], int, int, Any]] = deque()
        position = offset
        limit = 4 * usable_cores()  # chunks in flight
        coders = coders_for(self.level)

        def drain(keep: int) -> None:
            nonlocal position
            while len(pending) > keep:
                future, raw_length, flt, _alive = pending.popleft()
                for blob in future.result():
                    pwrite_all(fd, blob, position)
                    position += len(blob)
                    frames.append((len(blob), raw_length, flt))

        header = np.frombuffer(plan.header, dtype=np.uint8)
        pending.append((pool.submit(lambda: [encode_plane(header, coders)]), len(plan.header), FILTER_NONE, header))
        checksums: dict[str, int] = {}
        for p in plan.tensors:
            t = contiguous_cpu(p.tensor, p.name)
            raw = t.reshape(-1).view(torch.uint8) if p.end > p.begin else torch.empty(0, dtype=torch.uint8)
            checksums[p.name] = checksum(tensor_bytes(raw))
            width = itemsize(p.dtype)
            flt = _tensor_filter(p.dtype, raw.numel())
            step = self._step(width)
            for start in range(0, raw.numel(), step):
                chunk = raw[start : start + step]
                raw_length = chunk.numel() // width if flt in _PLANE_FILTERS else chunk.numel()
                pending.append((pool.submit(_encode_chunk, chunk, flt, width, coders), raw_length, flt, chunk))
                drain(limit)
        drain(0)
        return WrittenStream(
            length=position - offset,
            checksums=checksums,
            frames=b"".join(_FRAME.pack(*f) for f in frames),
            configuration=self.configuration(),
        )

    def open_section(self, section: SectionEntry) -> ZstdSection:
        return ZstdSection(section)


def _encode_chunk(chunk: torch.Tensor, flt: int, width: int, coders: tuple[tuple[int, ...], ...]) -> list[bytes]:
    if flt == FILTER_NONE:
        return [encode_plane(chunk.numpy(), coders)]
    planes = split_planes(chunk, width, flt == FILTER_FLOAT_PLANES)
    return [encode_plane(planes[i], coders) for i in range(width)]


class ZstdSection:
    """Reads one zstd section: its frame table checked once, each tensor's chunks, each plane's frame."""

    zero_copy = False

    def __init__(self, section: SectionEntry) -> None:
        self.section = section
        region = f"section {section.name!r} frame table"
        table = section.frames
        if len(table) % _FRAME.size or len(table) // _FRAME.size * MIN_FRAME > section.length:
            raise LayoutError(
                f"frame table of {len(table)} bytes does not fit a {section.length}-byte section", region=region
            )
        frames = list(_FRAME.iter_unpack(table))
        # (absolute offset, compressed length, raw length, filter) for every frame
        self.frames: list[tuple[int, int, int, int]] = []
        position = section.offset
        known = (FILTER_NONE, FILTER_SHUFFLE, *_PLANE_FILTERS)
        for i, (clen, rlen, flt) in enumerate(frames):
            if clen < MIN_FRAME or not 0 < rlen <= MAX_FRAME_RAW_SIZE or flt not in known:
                raise LayoutError(f"frame {i}: invalid lengths or filter ({clen}, {rlen}, {flt})", region=region)
            if clen < min_frame_length(rlen):
                # Tensors are allocated from the raw lengths before any frame is decoded, so a
                # raw length no real frame of this size can produce would let a few bytes of
                # table claim terabytes (and make the allocation itself fail).
                raise LayoutError(f"frame {i}: {clen} compressed bytes cannot hold {rlen} raw bytes", region=region)
            self.frames.append((position, clen, rlen, flt))
            position += clen
        #: the same rows as one array, for the compiled chunk decoder
        self.table = np.array(self.frames, dtype=np.uint64).reshape(-1, 4)
        if position != section.end:
            raise LayoutError(
                f"frames cover {position - section.offset} bytes of a {section.length}-byte section", region=region
            )
        if not frames or frames[0][1] != section.stream_header_length or frames[0][2] != FILTER_NONE:
            raise LayoutError("frame 0 must hold exactly the safetensors header, unfiltered", region=region)
        #: per tensor: (first frame, frames per chunk) of each chunk, in order
        self.tensor_chunks: dict[str, list[tuple[int, int]]] = {}
        #: per tensor: (first frame, one past its last frame), for tools that locate a tensor's bytes
        self.tensor_frames: dict[str, tuple[int, int]] = {}
        index = 1
        for t in section.tensors:  # data order
            chunks: list[tuple[int, int]] = []
            covered = 0
            width = itemsize(t.dtype)
            while covered < t.nbytes:
                if index >= len(frames):
                    raise LayoutError(f"frames end inside tensor {t.name!r}", region=region)
                _, rlen, flt = frames[index]
                count = _check_chunk(frames, index, width, t.dtype, region)
                chunks.append((index, count))
                covered += rlen * count if flt in _PLANE_FILTERS else rlen
                index += count
            if covered != t.nbytes:
                raise LayoutError(f"frames of tensor {t.name!r} cross its end", region=region)
            self.tensor_chunks[t.name] = chunks
            self.tensor_frames[t.name] = (chunks[0][0] if chunks else index, index)
        if index != len(frames):
            raise LayoutError(f"{len(frames) - index} frames belong to no tensor", region=region)

    def _frame(self, source: memoryview, i: int) -> tuple[memoryview, list[memoryview] | None]:
        """Frame ``i``, checked to end where the table says, and its raw blocks if it is a stored frame."""
        offset, clen, rlen, _ = self.frames[i]
        region = f"section {self.section.name!r} frame {i}"
        frame = source[offset : offset + clen]
        length, stored = walk_frame(frame, rlen, region)
        if length != clen:
            raise CodecError("data after the end of the zstd frame", region=region, offset=offset)
        return frame, stored

    def _decode(self, source: memoryview, i: int, out: torch.Tensor | np.ndarray) -> None:
        """Decompress frame ``i`` into ``out`` (exactly its raw length)."""
        frame, _ = self._frame(source, i)
        self._decompress(frame, i, out)

    def _decompress(self, frame: memoryview, i: int, out: torch.Tensor | np.ndarray) -> None:
        offset, _, rlen, _ = self.frames[i]
        region = f"section {self.section.name!r} frame {i}"
        target = writable_bytes(out) if isinstance(out, torch.Tensor) else out.data.cast("B")
        try:
            reader = decompressor().stream_reader(frame, read_across_frames=False)
            got = reader.readinto(target)
            extra = reader.read(1)
        except zstandard.ZstdError as e:
            raise CodecError(f"zstd: {e}", region=region, offset=offset) from None
        if got != rlen or extra:
            raise CodecError(
                f"frame decoded to {got}{'+' if extra else ''} bytes, expected {rlen}", region=region, offset=offset
            )

    def plane(self, source: memoryview, i: int, row: np.ndarray, *, content_checksum: bool = True) -> list[np.ndarray]:
        """The content of frame ``i`` as pieces: a stored frame's raw blocks where they lie in
        ``source`` (not copied; their length always checked, their content checksum unless
        ``content_checksum`` is false), any other frame decompressed into ``row`` (zstd checks it)."""
        frame, stored = self._frame(source, i)
        if stored is not None:
            region = f"section {self.section.name!r} frame {i}"
            check_stored(frame, stored, self.frames[i][2], region, content_checksum=content_checksum)
            return [np.frombuffer(piece, dtype=np.uint8) for piece in stored]
        context = chunk_decoder()
        if context is None or decode_chunk(context, frame, self.frames[i][0], self.table, i, 1, row, None, False,
                                           MAX_ZSTD_WINDOW):
            self._decompress(frame, i, row)  # decodes what the compiled decoder refused, or names the error
        return [row]

    def _decode_chunk(self, source: memoryview, first: int, count: int, out: torch.Tensor, width: int) -> None:
        flt, rlen = self.frames[first][3], self.frames[first][2]
        context = chunk_decoder()
        if context is not None and flt != FILTER_SHUFFLE:
            # a mapped file is passed whole; from a remote one, the chunk's bytes (its frames are contiguous)
            base = 0 if isinstance(source, memoryview) else self.frames[first][0]
            chunk = source if not base else source[base : self._frame_end(first + count - 1)]
            if decode_chunk(context, chunk, base, self.table, first, count, out.numpy(),
                            scratch(count * rlen) if count > 1 else None, flt == FILTER_FLOAT_PLANES,
                            MAX_ZSTD_WINDOW) is None:
                return
        # What the compiled decoder refused, the Python form of its rules decides (and names the error):
        # zstd builds differ on some corrupt frames, which decode with their content checksum intact.
        if flt == FILTER_NONE:
            self._decode(source, first, out)
            return
        if flt == FILTER_SHUFFLE:  # one frame holding all planes in turn (written before format 3.2)
            shuffled = scratch(rlen).reshape(width, rlen // width)
            self._decode(source, first, shuffled.reshape(-1))
            unshuffle(torch.from_numpy(shuffled.reshape(-1)), out, width)
            return
        buffer = scratch(count * rlen).reshape(count, rlen)
        # A whole tensor is decoded here, so the tensor checksum covers a stored frame's bytes whenever
        # the caller verifies; with verification off, its content checksum would be the only check left
        # (spec/codecs/zstd.md, Checksums).
        planes = [self.plane(source, first + k, buffer[k], content_checksum=False) for k in range(count)]
        join_planes(planes, out, width, flt == FILTER_FLOAT_PLANES)

    def stream_header(self, source: memoryview) -> bytes:
        out = torch.empty(self.section.stream_header_length, dtype=torch.uint8)
        self._decode(source, 0, out)
        return bytes(tensor_bytes(out))

    def view(self, source: memoryview, entry: TensorEntry) -> memoryview:
        raise TypeError("zstd sections have no zero-copy views")

    def piece_lengths(self, entry: TensorEntry) -> list[int]:
        """Raw length of each of ``decode_tasks``' jobs, in order (lets a reader hash as they finish)."""
        return [
            self.frames[first][2] * (count if self.frames[first][3] in _PLANE_FILTERS else 1)
            for first, count in self.tensor_chunks[entry.name]
        ]

    def stored_range(self, entry: TensorEntry) -> tuple[int, int]:
        """``(start, end)`` of the tensor's frames in the file: one contiguous run."""
        first, end = self.tensor_frames[entry.name]
        if end == first:
            return (0, 0)
        return self.frames[first][0], self.stored_end(entry)

    def _frame_end(self, i: int) -> int:
        offset, clen, _, _ = self.frames[i]
        return offset + clen

    def stored_end(self, entry: TensorEntry) -> int:
        first, end = self.tensor_frames[entry.name]
        return self._frame_end(end - 1 if end > first else 0)

    def decode_tasks(self, source: memoryview, entry: TensorEntry, out: torch.Tensor) -> list[Callable[[], None]]:
        width = itemsize(entry.dtype)
        tasks: list[Callable[[], None]] = []
        position = 0
        for (first, count), size in zip(self.tensor_chunks[entry.name], self.piece_lengths(entry), strict=True):
            tasks.append(_bind(self._decode_chunk, source, first, count, out[position : position + size], width))
            position += size
        return tasks


def _check_chunk(frames: list[tuple[int, int, int]], index: int, width: int, dtype: str, region: str) -> int:
    """How many frames the chunk starting at ``index`` takes; raises LayoutError if its filter does not fit."""
    _, rlen, flt = frames[index]
    if flt == FILTER_SHUFFLE and (width == 1 or rlen % width):
        raise LayoutError(f"frame {index}: shuffle filter on a frame that is not whole elements", region=region)
    if flt not in _PLANE_FILTERS:
        return 1
    if width == 1 or (flt == FILTER_FLOAT_PLANES and dtype not in FLOAT_TAGS):
        raise LayoutError(f"frame {index}: plane filter {flt} on a {dtype} tensor", region=region)
    group = frames[index : index + width]
    if len(group) != width or any(f[1] != rlen or f[2] != flt for f in group):
        raise LayoutError(
            f"frames {index}..{index + width - 1}: a plane group needs {width} frames of equal length", region=region
        )
    return width


def _bind(fn: Callable[..., None], *args: Any) -> Callable[[], None]:
    return lambda: fn(*args)
