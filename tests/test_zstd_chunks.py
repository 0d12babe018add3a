"""The compiled zstd chunk decoder (``_chunk.c``) against the Python form of the same rules."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

import mettaformat
from fuzz.targets import TARGETS, _decode_tensor, reference_planes
from mettaformat.codecs import ZstdCodec
from mettaformat.container.codecs import zstd_frames
from mettaformat.container.codecs.planes import ENTROPY, encode_plane
from mettaformat.container.codecs.zstd import FILTER_FLOAT_PLANES, FILTER_PLANES, ZstdSection
from mettaformat.container.header import SectionEntry, TensorEntry
from tests.test_codecs import _all_dtypes

CORPUS = Path(__file__).resolve().parent.parent / "fuzz" / "corpus" / "zstd_frame"
NO_COMPILED = "the compiled chunk decoder is not available (extension not built, or no libzstd 1.4+ to load)"


@pytest.fixture(params=["compiled", "python"])
def chunk_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the compiled chunk decoder, then with the Python form of its rules."""
    if request.param == "python":
        monkeypatch.setattr(zstd_frames, "_kernel", None)
    elif zstd_frames.chunk_decoder() is None:
        pytest.skip(NO_COMPILED)
    return str(request.param)


@pytest.mark.parametrize("frame_size", [4096, 1 << 16, 4 << 20])
def test_every_dtype_round_trips(chunk_path: str, frame_size: int) -> None:
    tensors = {**_all_dtypes(70_001), "small": torch.randn(7), "weights": torch.randn(300, 301) * 0.02}
    out = mettaformat.load(mettaformat.save(tensors, compression=ZstdCodec(frame_size=frame_size)))
    for name, t in tensors.items():
        assert torch.equal(out[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def _stored(content: bytes, blocks: list[int], *, single_segment: bool = True) -> bytes:
    """A zstd frame of raw blocks of the given sizes (the last takes the rest), as any writer may cut them."""
    sizes = [*blocks, len(content) - sum(blocks)]
    descriptor = (3 << 6) | (int(single_segment) << 5) | (1 << 2)
    parts = [struct.pack("<IB", 0xFD2FB528, descriptor) + (b"" if single_segment else bytes([0x58]))]
    parts.append(struct.pack("<Q", len(content)))
    position = 0
    for i, size in enumerate(sizes):
        parts.append((size << 3 | int(i == len(sizes) - 1)).to_bytes(3, "little"))
        parts.append(content[position : position + size])
        position += size
    parts.append(struct.pack("<I", xxhash.xxh64_intdigest(content) & 0xFFFFFFFF))
    return b"".join(parts)


def _chunk(frames: list[bytes], plane_length: int, flt: int, dtype: str) -> tuple[ZstdSection, memoryview, TensorEntry]:
    """A section whose one tensor is one chunk: ``frames`` are its byte planes."""
    nbytes = plane_length * len(frames)
    entry = TensorEntry(name="t", dtype=dtype, shape=(plane_length,), begin=0, end=nbytes, checksum=0)
    table = struct.pack("<QII", 64, 64, 0) + b"".join(struct.pack("<QII", len(f), plane_length, flt) for f in frames)
    body = b"".join(frames)
    section = SectionEntry.from_entries(name="s", offset=0, length=64 + len(body), codec="zstd", configuration={},
                                        stream_length=64 + nbytes, stream_header_length=64, stream_header_checksum=0,
                                        tensors=(entry,), aliases={}, order=("t",), frames=table)
    return ZstdSection(section), memoryview(bytes(64) + body), entry


@pytest.mark.parametrize("single_segment", [True, False])
def test_stored_planes_cut_unevenly_join_as_the_rule_says(chunk_path: str, single_segment: bool) -> None:
    rng = np.random.default_rng(3)
    n = 200_003
    words = (rng.standard_normal(n).astype(np.float32) * 0.02).view(np.uint8)
    planes = reference_planes(words, 4, True)
    frames = [
        _stored(planes[0].tobytes(), [1, 0, 1000, 70_000, 0], single_segment=single_segment),
        encode_plane(planes[1], (ENTROPY,)),  # compressed or stored, as the coder finds
        _stored(planes[2].tobytes(), [131_072, 5], single_segment=single_segment),
        encode_plane(planes[3], (ENTROPY,)),
    ]
    reader, source, entry = _chunk(frames, n, FILTER_FLOAT_PLANES, "F32")
    assert _decode_tensor(reader, source, entry, chunk_path == "compiled") == words.tobytes()


def test_a_plane_that_ends_early_is_refused_by_both(chunk_path: str) -> None:
    content = bytes(range(256)) * 40
    frames = [_stored(content, [100]), _stored(content[:-1], [100]), _stored(content, []), _stored(content, [])]
    frames[1] = frames[1][:5] + struct.pack("<Q", len(content)) + frames[1][13:]  # declares the full length
    reader, source, entry = _chunk(frames, len(content), FILTER_PLANES, "I32")
    got = _decode_tensor(reader, source, entry, chunk_path == "compiled")
    assert got == "CodecError: frame decoded to 10239 bytes, expected 10240 (section 's' frame 2)"


def test_damaged_frames_get_the_same_verdict_from_both_paths() -> None:
    """Every bit of every seed's frame header and block headers, and bytes across its payload, flipped
    in turn: the fuzz target asserts that both paths accept and refuse alike (and agree with zstd)."""
    if zstd_frames.chunk_decoder() is None:
        pytest.skip(NO_COMPILED)
    target = TARGETS["zstd_frame"]
    rng = random.Random(5)
    runs = 0
    for seed in sorted(CORPUS.iterdir()):
        data = seed.read_bytes()
        positions = list(range(5, min(len(data), 5 + 24))) + rng.sample(range(5, len(data)), min(40, len(data) - 5))
        for position in positions:
            for bit in (1, 2, 4, 8, 16, 32, 64, 128):
                mutated = bytearray(data)
                mutated[position] ^= bit
                target(bytes(mutated))
                runs += 1
    assert runs > 10_000


def test_compiled_decoder_refuses_calls_that_do_not_fit() -> None:
    context = zstd_frames.chunk_decoder()
    if context is None:
        pytest.skip(NO_COMPILED)
    content = bytes(range(64))
    reader, source, _ = _chunk([_stored(content, [])] * 4, 64, FILTER_PLANES, "I32")
    out, scratch = np.zeros(256, np.uint8), np.zeros(256, np.uint8)
    with pytest.raises(ValueError, match="1, 2, 4 or 8 frames"):
        zstd_frames.decode_chunk(context, source, 0, reader.table, 1, 3, out, scratch, False, 1 << 20)
    with pytest.raises(ValueError, match="outside the table"):
        zstd_frames.decode_chunk(context, source, 0, reader.table, 2, 4, out, scratch, False, 1 << 20)
    with pytest.raises(ValueError, match="does not fit"):
        zstd_frames.decode_chunk(context, source, 0, reader.table, 1, 4, out[:255], scratch, False, 1 << 20)
    with pytest.raises(ValueError, match="does not fit"):
        zstd_frames.decode_chunk(context, source, 0, reader.table, 1, 4, out, scratch[:255], False, 1 << 20)
    with pytest.raises((TypeError, BufferError)):  # a read-only destination
        zstd_frames.decode_chunk(context, source, 0, reader.table, 1, 4, bytes(256), scratch, False, 1 << 20)
    assert zstd_frames.decode_chunk(context, source, 0, reader.table, 1, 4, out, scratch, False, 1 << 20) is None
    # a table row pointing past the source is refused, not read
    assert zstd_frames.decode_chunk(context, source[:100], 0, reader.table, 1, 4, out, scratch, False, 1 << 20) == (
        0, "frame outside the bytes given", False)
    # the bytes of the chunk alone, given with their offset in the file (what a remote read passes)
    start, end = reader.frames[1][0], reader.frames[4][0] + reader.frames[4][1]
    out[:] = 0
    assert zstd_frames.decode_chunk(context, source[start:end], start, reader.table, 1, 4, out, scratch, False,
                                    1 << 20) is None
    assert bytes(out) == bytes(b for b in content for _ in range(4))  # four equal planes: each byte four times
    assert zstd_frames.decode_chunk(context, source[start:end], start + 1, reader.table, 1, 4, out, scratch, False,
                                    1 << 20) == (0, "frame outside the bytes given", False)
