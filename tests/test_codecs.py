"""Codecs as plug-ins: the registry, a third-party codec from outside the package, entry points,
and the zstd byte-plane filters (every dtype and level round-trips; the frame table is checked)."""

from __future__ import annotations

import itertools
import struct
import sys
import textwrap
import warnings
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

import mettaformat
from mettaformat.codecs import RawCodec, ZstdCodec, available_codecs, register_codec, unregister_codec
from mettaformat.container.codecs.base import WrittenStream, pwrite_all
from mettaformat.container.codecs.zstd import FILTER_FLOAT_PLANES, FILTER_NONE, FILTER_PLANES
from mettaformat.container.header import SectionEntry, TensorEntry
from mettaformat.container.layout import checksum
from mettaformat.container.stream import StreamPlan
from mettaformat.errors import CodecError, LayoutError, UnknownCodecError, WriteError
from tests import craft


# -- a codec written the way a third-party package would: only public interfaces ------------------
@dataclass(frozen=True)
class XorCodec:
    """Stores the stream with every data byte XORed with ``key`` (kept in the configuration)."""

    name: ClassVar[str] = "test.xor"
    filters: ClassVar[tuple[str, ...]] = ("xor",)
    key: int = 0x5A

    def configuration(self) -> dict[str, Any]:
        return {"key": self.key}

    @classmethod
    def from_configuration(cls, configuration: dict[str, Any]) -> XorCodec:
        return cls(**{k: v for k, v in configuration.items() if k == "key"})

    def frame_table_size(self, plan: StreamPlan) -> int:
        return 0

    def write(self, fd: int, offset: int, plan: StreamPlan, pool: Executor) -> WrittenStream:
        pwrite_all(fd, plan.header, offset)
        checksums = {}
        for p in plan.tensors:
            data = p.tensor.contiguous().reshape(-1).view(torch.uint8)
            checksums[p.name] = checksum(memoryview(data.numpy()))
            pwrite_all(fd, memoryview((data ^ self.key).numpy()), offset + len(plan.header) + p.begin)
        return WrittenStream(length=plan.length, checksums=checksums)

    def open_section(self, section: SectionEntry) -> _XorSection:
        key = section.configuration.get("key")
        if not isinstance(key, int) or not 0 <= key < 256:
            raise LayoutError(f"xor key {key!r}", region=f"section {section.name!r}")
        return _XorSection(section, key)


class _XorSection:
    zero_copy = False

    def __init__(self, section: SectionEntry, key: int) -> None:
        self.section, self.key = section, key

    def stream_header(self, source: memoryview) -> bytes:
        return bytes(source[self.section.offset : self.section.offset + self.section.stream_header_length])

    def view(self, source: memoryview, entry: TensorEntry) -> memoryview:
        raise TypeError("no views")

    def decode_tasks(self, source: memoryview, entry: TensorEntry, out: torch.Tensor) -> list[Callable[[], None]]:
        start = self.section.offset + self.section.stream_header_length + entry.begin

        def run() -> None:
            stored = torch.frombuffer(source[start : start + entry.nbytes], dtype=torch.uint8)
            out.copy_(stored ^ self.key)

        return [run] if entry.nbytes else []


@pytest.fixture
def xor_codec() -> Any:
    register_codec(XorCodec)
    yield XorCodec
    unregister_codec(XorCodec.name)


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 33, generator=g), "b": torch.arange(7, dtype=torch.int16), "e": torch.empty(0)}


def test_third_party_codec_round_trips_and_unknown_codec_names_it(tmp_path: Path, xor_codec: Any) -> None:
    weights = _weights()
    path = tmp_path / "x.mfmt"
    mettaformat.save_file(weights, path, compression=XorCodec(key=7), metadata={"epoch": 1})
    assert "test.xor" in available_codecs()
    raw = path.read_bytes()
    assert weights["w"].numpy().tobytes() not in raw  # really transformed
    with mettaformat.open(path) as ckpt:
        assert ckpt.header.sections[0].codec == "test.xor"
        assert ckpt.header.sections[0].configuration == {"key": 7}
        assert torch.equal(ckpt.get_tensor("w"), weights["w"])
    loaded = mettaformat.load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    # by name, with the codec's default configuration
    mettaformat.save_file(weights, tmp_path / "n.mfmt", compression="test.xor")
    assert torch.equal(mettaformat.load_file(tmp_path / "n.mfmt")["b"], weights["b"])
    unregister_codec("test.xor")
    with pytest.raises(UnknownCodecError, match=r"unknown codec 'test\.xor'") as info:
        mettaformat.open(path)
    assert info.value.region == "section 'model'"
    register_codec(XorCodec)  # for the fixture's teardown


def test_registry_guards_names(xor_codec: Any) -> None:
    register_codec(XorCodec)  # the same class again is fine
    other = type("OtherXor", (XorCodec,), {})
    with pytest.raises(ValueError, match="already registered"):
        register_codec(other)
    register_codec(other, replace=True)
    with pytest.raises(ValueError, match="built in"):
        register_codec(type("FakeRaw", (RawCodec,), {}), replace=True)
    with pytest.raises(TypeError, match="lacks"):
        register_codec(type("Broken", (), {"name": "test.broken", "filters": ()}))
    with pytest.raises(ValueError, match="printable ASCII"):
        register_codec(type("Bad", (XorCodec,), {"name": "bad\nname"}))
    assert {"raw", "zstd", "test.xor"} <= set(available_codecs())


def test_entry_point_makes_an_installed_codec_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "toy_codec_pkg.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from mettaformat.codecs import RawCodec

        @dataclass(frozen=True)
        class ToyCodec(RawCodec):
            name = "toy.raw"
    """))
    dist = tmp_path / "toy_codec_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-codec-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mettaformat.codecs]\ntoy.raw = toy_codec_pkg:ToyCodec\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "toy.raw" in available_codecs()
        mettaformat.save_file(_weights(), tmp_path / "t.mfmt", compression="toy.raw")
        assert torch.equal(mettaformat.load_file(tmp_path / "t.mfmt")["b"], _weights()["b"])
    finally:
        unregister_codec("toy.raw")
        sys.modules.pop("toy_codec_pkg", None)


def test_broken_entry_point_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "broken_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mettaformat.codecs]\ntoy.missing = no_such_module_xyz:Codec\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(WriteError, match=r"toy\.missing"):
        mettaformat.save(_weights(), compression="toy.missing")  # type: ignore[arg-type]


def test_none_is_a_deprecated_alias_of_raw() -> None:
    with pytest.warns(DeprecationWarning, match='"raw"'):
        data = mettaformat.save(_weights(), compression="none")  # type: ignore[arg-type]
    parts = craft.parse(data)
    assert parts.section()["codec"]["name"] == "raw"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert craft.parse(mettaformat.save(_weights(), compression="raw")).section()["codec"]["name"] == "raw"


@pytest.mark.parametrize("level", [0, 23, -8, "slow", True, 2.5])
def test_levels_that_mean_nothing_are_refused(level: Any) -> None:
    with pytest.raises(WriteError, match="level"):
        mettaformat.save(_weights(), compression="zstd", level=level)


def _all_dtypes(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(n, generator=g) * 0.02
    return {
        "f32": base, "bf16": base.to(torch.bfloat16), "f16": base.half(), "f64": base.double(),
        "i64": torch.randint(-5, 5, (n,), generator=g), "i32": torch.arange(n, dtype=torch.int32),
        "i16": torch.randint(0, 3, (n,), generator=g, dtype=torch.int16),
        "u8": torch.randint(0, 9, (n,), dtype=torch.uint8),
        "bool": base > 0, "c64": torch.complex(base, -base), "f8": base.to(torch.float8_e4m3fn),
        "small": base[:5].clone(), "scalar": torch.tensor(3.5), "empty": torch.empty(0, 3),
        "odd": base[: n - 3].reshape(-1).clone(),
    }


@pytest.mark.parametrize("level", ["fast", 3, -1, "max"])
def test_planes_round_trip_every_dtype_and_level(level: Any) -> None:
    tensors = _all_dtypes(6000)
    codec = ZstdCodec(level=level, frame_size=8192)  # several chunks per tensor
    data = mettaformat.save(tensors, compression=codec)
    out = mettaformat.load(data)
    for name, t in tensors.items():
        got, want = out[name].reshape(-1), t.reshape(-1)
        assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
    filters = {f[2] for f in struct.iter_unpack("<QII", craft.parse(data).section()["frames"])}
    assert {FILTER_NONE, FILTER_FLOAT_PLANES, FILTER_PLANES} <= filters


def test_random_planes_are_stored_and_exponents_compress() -> None:
    w = torch.randn(256, 1024) * 0.05
    data = mettaformat.save({"w": w}, compression="zstd")
    parts = craft.parse(data)
    frames = parts.frames()
    planes = frames[1:5]  # the first chunk's four planes, low byte first
    assert [f[2] for f in planes] == [FILTER_FLOAT_PLANES] * 4
    blobs = [f[0] for f in planes]
    assert all(b[4] == 0xE4 for b in blobs[:2])  # stored frames: low mantissa bytes cost no compression
    assert len(blobs[3]) < len(blobs[0]) / 2  # the exponent plane
    assert len(data) < w.numel() * 4 / 1.15


def _corrupt_group(data: bytes, edit: Callable[[list[tuple[int, int, int]]], None]) -> bytes:
    parts = craft.parse(data)
    table = list(struct.iter_unpack("<QII", parts.section()["frames"]))
    edit(table)
    parts.section()["frames"] = b"".join(struct.pack("<QII", *f) for f in table)
    return craft.build(parts)


def test_plane_group_rules_are_checked(tmp_path: Path) -> None:
    data = mettaformat.save({"w": torch.randn(4096), "i": torch.arange(2048, dtype=torch.int32)}, compression="zstd")

    def short_group(t: list[tuple[int, int, int]]) -> None:
        t[2] = (t[2][0], t[2][1] + 1, t[2][2])

    def float_filter_on_int(t: list[tuple[int, int, int]]) -> None:
        for k in range(len(t)):
            if t[k][2] == FILTER_PLANES:
                t[k] = (t[k][0], t[k][1], FILTER_FLOAT_PLANES)

    for edit, message in ((short_group, "plane group"), (float_filter_on_int, "plane filter 2 on a I32")):
        path = tmp_path / "bad.mfmt"
        path.write_bytes(_corrupt_group(data, edit))
        with pytest.raises(LayoutError, match=message):
            mettaformat.open(path)


def test_decode_pieces_cover_each_tensor(tmp_path: Path) -> None:
    tensors = _all_dtypes(5000)
    path = tmp_path / "p.mfmt"
    mettaformat.save_file(tensors, path, compression=ZstdCodec(frame_size=4096))
    with mettaformat.open(path) as ckpt:
        section = ckpt.header.section("model")
        assert section is not None
        reader = ckpt.section_reader("model")
        for entry in section.tensors:
            pieces = reader.piece_lengths(entry)  # type: ignore[attr-defined]
            assert sum(pieces) == entry.nbytes, entry.name
            out = torch.empty(entry.nbytes, dtype=torch.uint8)
            tasks = reader.decode_tasks(ckpt._mapped(), entry, out)
            assert len(tasks) == len(pieces)


def test_large_frames_round_trip_without_keeping_their_scratch() -> None:
    from mettaformat.container.codecs import planes

    t = torch.randn(6 << 20) * 0.02  # 24 MiB in one chunk: its split and join buffers are not kept
    data = mettaformat.save({"t": t}, compression=ZstdCodec(frame_size=32 << 20))
    assert torch.equal(mettaformat.load(data)["t"], t)
    assert len(planes.scratch(planes._SCRATCH_KEEP + 1)) == planes._SCRATCH_KEEP + 1
    assert all(len(b) <= planes._SCRATCH_KEEP for b in getattr(planes._local, "buffers", {}).values())


# -- fast paths against plain references ----------------------------------------------------------
@pytest.fixture(params=["compiled", "numpy"])
def plane_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the compiled split and join, then with the numpy form of the same rule."""
    from mettaformat.container.codecs import planes

    if request.param == "numpy":
        monkeypatch.setattr(planes, "_kernel", None)
    elif planes._kernel is None:
        pytest.skip("the _planes extension is not built (no C compiler at install time)")
    return str(request.param)


@pytest.mark.parametrize("width", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 3, (1 << 16) - 1, (1 << 16) + 5, 150_001])
def test_split_and_join_match_the_byte_by_byte_rule(width: int, n: int, plane_kernel: str) -> None:
    from fuzz.targets import reference_planes
    from mettaformat.container.codecs.planes import join_planes, split_planes

    rng = np.random.default_rng(n + width)
    data = rng.integers(0, 256, n * width, dtype=np.uint8)
    for float_bits, offset in itertools.product((False, True), (0, 1, 3)):
        # elements and output off their natural alignment, as slices of a larger buffer can be
        source = torch.from_numpy(np.concatenate([np.zeros(offset, np.uint8), data]))[offset:]
        planes = split_planes(source, width, float_bits).copy()
        want = reference_planes(data, width, float_bits)
        assert np.array_equal(planes, want) and np.array_equal(source.numpy(), data)
        # each plane in uneven pieces (as a stored frame's raw blocks arrive), joined back
        cuts = sorted({0, n, *rng.integers(0, n + 1, 3).tolist()})
        pieces = [[plane[a:b] for a, b in itertools.pairwise(cuts)] for plane in want]
        out = torch.zeros(n * width + offset, dtype=torch.uint8)[offset:]
        join_planes(pieces, out, width, float_bits)
        assert np.array_equal(out.numpy(), data), (float_bits, offset)


def test_both_kernels_round_trip_every_dtype(plane_kernel: str) -> None:
    tensors = _all_dtypes(3001)
    data = mettaformat.save(tensors, compression=ZstdCodec(frame_size=4096))
    out = mettaformat.load(data)
    for name, t in tensors.items():
        assert torch.equal(out[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_kernel_refuses_buffers_that_do_not_fit() -> None:
    from mettaformat.container.codecs import planes

    if planes._kernel is None:
        pytest.skip("the _planes extension is not built (no C compiler at install time)")
    plane = np.zeros(8, dtype=np.uint8)
    with pytest.raises(ValueError, match="width must be 2, 4 or 8"):
        planes._kernel.join(np.zeros(24, np.uint8), [plane] * 3, False)
    with pytest.raises(ValueError, match="plane 1 holds 7 bytes, not 8"):
        planes._kernel.join(np.zeros(16, np.uint8), [plane, plane[:7]], False)
    with pytest.raises(ValueError, match="not whole 4-byte elements"):
        planes._kernel.split(np.zeros(30, np.uint8), [plane] * 4, False)
    with pytest.raises((TypeError, BufferError)):  # a read-only destination
        planes._kernel.join(bytes(16), [plane, plane], False)


def test_join_refuses_pieces_that_do_not_fill_the_plane() -> None:
    from mettaformat.container.codecs.planes import join_planes

    plane = np.zeros(8, dtype=np.uint8)
    with pytest.raises(ValueError, match="7 bytes, not 8"):
        join_planes([[plane], [plane[:7]]], torch.empty(16, dtype=torch.uint8), 2, False)


def _section_of(frames: list[bytes], raw: int, dtype: str, flt: int) -> tuple[Any, memoryview, TensorEntry]:
    """A one-tensor zstd section reader over ``frames`` (a plane group), as the fuzz target builds it."""
    from mettaformat.container.codecs.zstd import ZstdSection

    head = craft.zstd_frame(bytes(64))
    nbytes = raw * len(frames)
    entry = TensorEntry(name="t", dtype=dtype, shape=(nbytes // len(frames),), begin=0, end=nbytes, checksum=0)
    table = struct.pack("<QII", len(head), 64, 0) + b"".join(struct.pack("<QII", len(f), raw, flt) for f in frames)
    section = SectionEntry.from_entries(
        name="s", offset=0, length=len(head) + sum(map(len, frames)), codec="zstd", configuration={},
        stream_length=64 + nbytes, stream_header_length=64, stream_header_checksum=0, tensors=(entry,), aliases={},
        order=("t",), frames=table)
    return ZstdSection(section), memoryview(head + b"".join(frames)), entry


def test_stored_frames_read_in_place_agree_with_zstd() -> None:
    """A plane in a frame of raw blocks is read where it lies; the result equals zstd's decompression."""
    import zstandard

    from mettaformat.container.codecs.zstd_frames import stored_frame

    rng = np.random.default_rng(7)
    raw = 300_000  # three raw blocks and a part
    planes = [rng.integers(0, 256, raw, dtype=np.uint8) for _ in range(4)]
    planes[3][:] = rng.integers(120, 124, raw)  # an exponent-like plane that compresses
    frames = [stored_frame(p.data) for p in planes[:3]] + [craft.zstd_frame(planes[3].tobytes())]
    reader, source, entry = _section_of(frames, raw, "F32", FILTER_FLOAT_PLANES)
    out = torch.empty(entry.nbytes, dtype=torch.uint8)
    for task in reader.decode_tasks(source, entry, out):
        task()
    decoded = [np.frombuffer(zstandard.ZstdDecompressor().decompress(f), dtype=np.uint8) for f in frames]
    want = np.stack(decoded, axis=1)
    hi, lo = want[:, 3].copy(), want[:, 2].copy()
    want[:, 3], want[:, 2] = (lo & 0x80) | (hi >> 1), (lo & 0x7F) | (hi << 7)
    assert np.array_equal(out.numpy(), want.reshape(-1))


def test_a_stored_frame_read_alone_is_checked_like_any_other() -> None:
    from mettaformat.container.codecs.zstd_frames import stored_frame

    good = stored_frame(bytes(range(256)) * 1024)
    flipped = bytearray(good)
    flipped[100] ^= 1
    bad_sum = bytearray(good)
    bad_sum[-1] ^= 0xFF  # the content checksum itself
    for frame in (bytes(flipped), bytes(bad_sum)):
        reader, source, _ = _section_of([frame, good], 256 * 1024, "I16", FILTER_PLANES)
        with pytest.raises(CodecError, match="checksum mismatch"):
            reader.plane(source, 1, np.empty(256 * 1024, dtype=np.uint8))
    short = bytearray(good)
    short[13:16] = ((100 << 3) | 1).to_bytes(3, "little")  # one last block of 100 bytes: too few
    reader, source, entry = _section_of([bytes(short[: 16 + 100]) + good[-4:], good], 256 * 1024, "I16", FILTER_PLANES)
    with pytest.raises(CodecError, match="decoded to 100 bytes"):
        for task in reader.decode_tasks(source, entry, torch.empty(entry.nbytes, dtype=torch.uint8)):
            task()


def _flip_in_stored_frame(path: Path, where: int) -> None:
    """Flip one bit at ``where`` (a payload offset, or -1 for the content checksum) of the first stored frame."""
    from mettaformat.container.reader import LazyCheckpoint

    with LazyCheckpoint(path, verify=False) as ckpt:
        frames = ckpt.section_reader("model").frames
    data = bytearray(path.read_bytes())
    offset, length, _, _ = next(f for f in frames if data[f[0] + 4] == 0xE4)  # a stored frame's descriptor
    data[offset + length - 1 if where < 0 else offset + 16 + where] ^= 1
    path.write_bytes(bytes(data))


def test_a_whole_tensor_relies_on_its_checksum_for_stored_frames(tmp_path: Path) -> None:
    """A stored frame's bytes are checked once: by the tensor checksum when verifying, not at all when not."""
    from mettaformat.errors import IntegrityError

    t = torch.randn(100_000)  # random low mantissa bytes: stored frames
    for where in (5, -1):
        path = tmp_path / f"w{where}.mfmt"
        mettaformat.save_file({"t": t}, path, compression="zstd")
        _flip_in_stored_frame(path, where)
        if where < 0:  # the content checksum is not consulted; the bytes are intact
            assert torch.equal(mettaformat.load_file(path)["t"], t)
            continue
        with pytest.raises(IntegrityError, match="checksum mismatch in tensor 't'"):
            mettaformat.load_file(path)
        loaded = mettaformat.load_file(path, verify=False)["t"]  # the caller asked for no checksums
        assert (loaded != t).sum() == 1


def test_large_decode_destinations_are_ordinary_tensors() -> None:
    from mettaformat._torch import HUGE_PAGE_MIN, fresh_bytes

    out = fresh_bytes(HUGE_PAGE_MIN + 3)
    assert out.dtype == torch.uint8 and out.numel() == HUGE_PAGE_MIN + 3 and out.is_contiguous()
    out.fill_(7)
    weights = out[: HUGE_PAGE_MIN].view(torch.float32).reshape(1024, -1)
    del out
    assert int(weights.reshape(-1).view(torch.uint8)[-1]) == 7  # the view keeps the mapping alive
    t = torch.randn(HUGE_PAGE_MIN // 4 + 5)  # decoded into such a buffer
    loaded = mettaformat.load(mettaformat.save({"t": t}, compression="zstd"))["t"]
    assert torch.equal(loaded, t) and torch.equal(loaded.clone().share_memory_(), t)


def test_small_tensors_decode_in_batches_and_each_waits_for_its_own() -> None:
    """Jobs are grouped into pool jobs of about BATCH_BYTES; a tensor's range names every batch that holds its jobs."""
    from concurrent.futures import ThreadPoolExecutor

    from mettaformat.container.section_load import BATCH_BYTES, _Batches

    ran: list[int] = []
    with ThreadPoolExecutor(1) as pool:
        batches = _Batches(pool)
        small = batches.add([lambda: ran.append(0)], 1000)
        empty = batches.add([], 0)
        large = batches.add([lambda k=k: ran.append(k) for k in (1, 2, 3)], 3 * BATCH_BYTES)
        tail = batches.add([lambda: ran.append(4)], 1000)
        batches.flush()
        assert (small, empty, large, tail) == ((0, 0), (0, 0), (0, 2), (3, 3))
        for future in batches.submitted:
            future.result()
    assert ran == [0, 1, 2, 3, 4] and len(batches.submitted) == 4


def test_small_sections_decode_in_the_calling_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below PARALLEL_MIN_BYTES a load decodes where it was called (a pool wake-up costs more); above, on the pool."""
    import threading

    from mettaformat._pool import PARALLEL_MIN_BYTES
    from mettaformat.container.codecs.zstd import ZstdSection

    threads: set[int] = set()
    decode = ZstdSection._decode_chunk

    def recording(self: ZstdSection, *args: Any) -> None:
        threads.add(threading.get_ident())
        decode(self, *args)

    monkeypatch.setattr(ZstdSection, "_decode_chunk", recording)
    for n, in_caller in ((PARALLEL_MIN_BYTES // 8, True), (PARALLEL_MIN_BYTES * 2, False)):  # n bytes in all
        tensors = {f"t{i}": torch.randn(n // 16) for i in range(4)}
        mettaformat.save_file(tensors, tmp_path / "x.mfmt", compression="zstd")
        threads.clear()
        loaded = mettaformat.load_file(tmp_path / "x.mfmt")
        assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
        assert (threads == {threading.get_ident()}) == in_caller, threads
    # a small delta checkpoint's rebuild too
    from mettaformat.container import delta_planes

    rebuild = delta_planes._rebuild_chunk

    def recording_rebuild(*args: Any) -> None:
        threads.add(threading.get_ident())
        rebuild(*args)

    monkeypatch.setattr(delta_planes, "_rebuild_chunk", recording_rebuild)
    before = {"w": torch.randn(4096) * 0.02}
    after = {"w": before["w"] + 1e-4 * torch.randn(4096)}
    mettaformat.save_file(before, tmp_path / "base.mfmt", compression="zstd")
    mettaformat.save_file(after, tmp_path / "delta.mfmt", base=tmp_path / "base.mfmt")
    threads.clear()
    assert torch.equal(mettaformat.load_file(tmp_path / "delta.mfmt")["w"], after["w"])
    assert threads == {threading.get_ident()}


def test_a_failing_job_among_batched_ones_fails_the_load(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.full((64,), float(i)) for i in range(40)}
    path = tmp_path / "many.mfmt"
    mettaformat.save_file(tensors, path, compression="zstd")
    from mettaformat.container.reader import LazyCheckpoint

    with LazyCheckpoint(path, verify=False) as ckpt:
        offset = ckpt.section_reader("model").frames[30][0]
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF  # the magic of the frame holding t29
    path.write_bytes(bytes(data))
    with pytest.raises(CodecError, match="frame 30"):
        mettaformat.load_file(path, verify=False)
