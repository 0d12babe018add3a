"""Hostile and malformed containers: catalogue rows FR1-FR11, TT1-TT13, MD1-MD10, ZS1-ZS9, IN1-IN3, FS1, FS4.

The catalogue is ``docs/threat-model.md``. Every crafted input must raise one specific
:class:`MettaFormatError` subclass whose message (and region) names what is wrong; never another
exception type, never a partial result. Inputs are made from valid files with ``tests/craft.py``,
which recomputes the header and trailer checksums and lengths so that the *intended* check is
the one that fires.

Each ``case_*`` builder returns :class:`Case` objects; the per-row tests run them in-process and
``test_every_crafted_file_fails_fast_in_a_subprocess`` runs all of them again in a fresh
interpreter under a timeout, checking time per file and peak RSS (``tracemalloc`` does not see
torch or libzstd allocations, RSS does).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import stat
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import zstandard

import mettaformat
from mettaformat.constants import (
    MAX_HEADER_SIZE,
    MAX_INDEX_SIZE,
    MAX_RANK,
    MAX_SECTIONS,
    MAX_TENSORS_PER_SECTION,
    MAX_TREE_DEPTH,
    MAX_ZSTD_WINDOW,
)
from mettaformat.container.header import decode_msgpack
from mettaformat.errors import (
    BadMagicError,
    CodecError,
    FormatError,
    HeaderError,
    IntegrityError,
    LayoutError,
    LimitExceededError,
    MettaFormatError,
    UnknownCodecError,
    UnsupportedVersionError,
)
from tests import craft

REPO = Path(__file__).resolve().parents[1]
U64_MAX = (1 << 64) - 1


# -- base files and cases --------------------------------------------------------------------------
def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "a": torch.randn(64, generator=g),  # F32, 256 bytes
        "b": torch.arange(33),  # I64, 264 bytes
        "c": torch.randn(5, 5, generator=g).half(),  # F16, 50 bytes
        "x": torch.ones(8),  # F32, 32 bytes
        "y": torch.randn(8, generator=g),  # F32, 32 bytes (same size as x, for swaps)
    }


@functools.cache
def base(compression: str) -> bytes:
    """A small valid file: one section at 4096, one frame per tensor for zstd."""
    return mettaformat.save(_tensors(), metadata={"epoch": 2}, compression=compression)  # type: ignore[arg-type]


def raw() -> craft.Parts:
    return craft.parse(base("raw"))


def zst() -> craft.Parts:
    return craft.parse(base("zstd"))


@dataclass
class Case:
    row: str
    label: str
    data: bytes
    #: the exact class expected; None: the file must load completely
    exc: type[MettaFormatError] | None
    #: a regex the message must contain
    match: str = ""
    #: a regex the region must match (None: not checked)
    region: str | None = None


def full_load(path: Path) -> dict[str, torch.Tensor]:
    """Everything a reader can do with a file: open, load every section, check the structure."""
    out: dict[str, torch.Tensor] = {}
    with mettaformat.open(path) as ckpt:
        for section in ckpt.sections:
            for name, t in ckpt.load_section(section).items():
                out[f"{section}/{name}"] = t
        ckpt.verify_structure()
        ckpt.metadata  # noqa: B018
    return out


def expect(case: Case, tmp_path: Path) -> dict[str, torch.Tensor] | None:
    path = tmp_path / f"{case.row}-{re.sub(r'[^A-Za-z0-9]+', '_', case.label)}.mfmt"
    path.write_bytes(case.data)
    if case.exc is None:
        return full_load(path)
    with pytest.raises(MettaFormatError) as info:
        full_load(path)
    err = info.value
    assert type(err) is case.exc, f"{case.row} {case.label}: {type(err).__name__}: {err}"
    assert err.file == str(path), f"{case.row} {case.label}: the error does not name the file: {err}"
    # The message proper, after the file name every entry point puts first.
    assert re.search(case.match, str(err).removeprefix(f"{path}: ")), f"{case.row} {case.label}: {err}"
    if case.region is not None:
        assert err.region is not None and re.search(case.region, err.region), f"{case.row} {case.label}: {err}"
    return None


def run(cases: list[Case], tmp_path: Path) -> None:
    assert cases
    for case in cases:
        expect(case, tmp_path)


BUILDERS: list[Callable[[], list[Case]]] = []


def builder(fn: Callable[[], list[Case]]) -> Callable[[], list[Case]]:
    BUILDERS.append(fn)
    return fn


def set_in(where: Callable[[craft.Parts], dict[str, Any]], **fields: Any) -> Callable[[craft.Parts], None]:
    """An edit that updates the dict ``where(parts)`` with ``fields``."""
    return lambda p: where(p).update(**fields)


def edit(parts: craft.Parts, fn: Callable[[craft.Parts], Any], **kwargs: Any) -> bytes:
    fn(parts)
    return craft.build(parts, **kwargs)


def header_with(parts: craft.Parts, marker_value: bytes, where: Callable[[dict[str, Any]], None]) -> bytes:
    """The header encoded with one value replaced by hand-made msgpack bytes.

    ``where`` stores the string ``"@@MARK@@"`` somewhere in the header dict; its encoding is then
    replaced by ``marker_value`` (which may be anything, valid msgpack or not).
    """
    where(parts.header)
    packed = craft.pack(parts.header)
    mark = craft.pack("@@MARK@@")
    assert packed.count(mark) == 1
    return packed.replace(mark, marker_value)


def set_metadata(value: Any) -> Callable[[dict[str, Any]], None]:
    def where(h: dict[str, Any]) -> None:
        h["metadata"] = value

    return where


def nested(depth: int, inner: bytes = b"\xc0", opener: bytes = b"\x91") -> bytes:
    return opener * depth + inner


# -- A. container framing --------------------------------------------------------------------------
@builder
def case_A1() -> list[Case]:
    good = base("raw")
    return [
        Case("FR1", "empty file", b"", LayoutError, "too small", "preamble"),
        Case("FR1", "one byte", b"\x89", LayoutError, "too small", "preamble"),
        Case("FR1", "31 bytes of preamble", good[:31], LayoutError, "too small", "preamble"),
        Case("FR1", "preamble only", good[:32], LayoutError, "runs past the end", "preamble"),
        Case("FR1", "preamble and tail only", good[:32] + good[-32:], LayoutError, "runs past the end", "preamble"),
    ]


def test_FR1_empty_and_too_small_files(tmp_path: Path) -> None:
    run(case_A1(), tmp_path)


@pytest.mark.parametrize("compression", ["raw", "zstd"])
def test_FR2_truncation_at_every_offset(tmp_path: Path, compression: str) -> None:
    data = base(compression)
    path = tmp_path / "cut.mfmt"
    path.write_bytes(data)
    for cut in range(len(data) - 1, -1, -1):
        os.truncate(path, cut)  # much faster than rewriting the file each time
        with pytest.raises(MettaFormatError) as info:
            full_load(path)
        # Always a layout error naming where the file ends: never a shorter tensor set.
        assert type(info.value) is LayoutError, (cut, info.value)
        assert re.search("too small|past the end|end magic", str(info.value)), (cut, info.value)


@builder
def case_A3() -> list[Case]:
    good = base("raw")
    flipped = b"\x88" + good[1:]
    lf = good[:4] + b"\n" + good[6:]  # CR LF -> LF (newline translation)
    zip_like = b"PK\x03\x04" + good[4:]
    pickle_like = pickle.dumps({"w": list(range(20))}, protocol=2)
    st_body = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    safetensors_like = struct.pack("<Q", len(st_body)) + st_body + b"\x00" * 4
    return [
        Case("FR3", "flipped magic", flipped, BadMagicError, "not a mettaformat file", "preamble"),
        Case("FR3", "newline translated", lf, BadMagicError, "not a mettaformat file", "preamble"),
        Case("FR3", "zip signature", zip_like, BadMagicError, r"not a mettaformat file \(magic b'PK", "preamble"),
        Case("FR3", "pickle", pickle_like, BadMagicError, "not a mettaformat file", "preamble"),
        Case("FR3", "safetensors", safetensors_like, BadMagicError, "not a mettaformat file", "preamble"),
    ]


def test_FR3_wrong_magic(tmp_path: Path) -> None:
    run(case_A3(), tmp_path)
    for case in case_A3():
        path = tmp_path / "m.mfmt"
        path.write_bytes(case.data)
        with pytest.raises(BadMagicError) as info:
            mettaformat.open(path)
        assert info.value.offset == 0


@builder
def case_A4() -> list[Case]:
    garbage = b"\xc1" * 40  # not msgpack, and its checksum is wrong too
    return [
        Case("FR4", "major 4", craft.build(raw(), major=4, minor=0), UnsupportedVersionError,
             r"version 4\.0 not supported.*3"),
        Case("FR4", "major 2 (legacy numbering)", craft.build(raw(), major=2, minor=0), UnsupportedVersionError,
             "2.0 not"),
        Case("FR4", "major 65535", craft.build(raw(), major=65535), UnsupportedVersionError, "65535"),
        # The version is checked before anything else is parsed: a broken header does not matter.
        Case("FR4", "major 4, garbage header", craft.build(raw(), major=4, header_bytes=garbage, header_checksum=1),
             UnsupportedVersionError, "version 4"),
        Case("FR4", "required flag bit 1", craft.build(raw(), flags=0b11), UnsupportedVersionError,
             "unknown feature flags 0x2"),
        Case("FR4", "required flag bit 15", craft.build(raw(), flags=1 | 1 << 15), UnsupportedVersionError,
             "0x8000"),
        Case("FR4", "must_understand extension", edit(raw(), lambda p: p.header.update(must_understand=["dict-zstd"])),
             UnsupportedVersionError, "dict-zstd"),
        Case("FR4", "must_understand not a string",
             edit(raw(), lambda p: p.header.update(must_understand=[["x"], {"y": 1}])),
             HeaderError, r"must_understand\[0\]: expected str"),
    ]


def test_FR4_future_version_and_required_features(tmp_path: Path) -> None:
    run(case_A4(), tmp_path)
    path = tmp_path / "v.mfmt"
    path.write_bytes(craft.build(raw(), major=4, minor=0))
    with pytest.raises(UnsupportedVersionError) as info:
        mettaformat.open(path)
    assert info.value.found == (4, 0) and info.value.offset == 8


def test_FR4_unknown_optional_flags_and_newer_minor_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "opt.mfmt"
    path.write_bytes(craft.build(raw(), flags=1 | 1 << 16 | 1 << 31, minor=7))
    with pytest.warns(UserWarning, match="3.7"):
        loaded = full_load(path)
    assert torch.equal(loaded["model/a"], _tensors()["a"])


@builder
def case_A5() -> list[Case]:
    good = craft.build(raw())
    n = len(good)

    def far_section(p: craft.Parts) -> None:
        p.section()["offset"] = 4096 * 1000

    return [
        Case("FR5", "header length = file size", craft.build(raw(), header_length=n), LayoutError,
             f"header length {n} runs past the end of a {n}-byte file", "preamble"),
        Case("FR5", "header length just past the tail", craft.build(raw(), header_length=n - 63), LayoutError,
             "runs past the end", "preamble"),
        Case("FR5", "index length = file size", craft.build(raw(), index_length=n), LayoutError,
             "runs past the start", "trailer"),
        Case("FR5", "section offset far past the end", edit(raw(), far_section), LayoutError,
             "bytes of padding before it", "section 'model'"),
    ]


def test_FR5_lengths_beyond_the_file(tmp_path: Path) -> None:
    run(case_A5(), tmp_path)


@builder
def case_A6() -> list[Case]:
    def stream_prefix(value: int) -> Callable[[craft.Parts], None]:
        def fn(p: craft.Parts) -> None:
            blob = p.blobs[0][1]
            blob[0:8] = struct.pack("<Q", value)
            hl = p.section()["stream"]["header_length"]
            p.section()["stream"]["header_checksum"] = craft.xxh(bytes(blob[:hl])).to_bytes(8, "little")

        return fn

    cases = []
    for value in (1 << 63, U64_MAX, U64_MAX - 31):
        cases += [
            Case("FR6", f"header length {value}", craft.build(raw(), header_length=value), LimitExceededError,
                 f"header length {value} exceeds the limit {MAX_HEADER_SIZE}", "preamble"),
            Case("FR6", f"index length {value}", craft.build(raw(), index_length=value), LimitExceededError,
                 f"trailer index length {value} exceeds the limit {MAX_INDEX_SIZE}", "trailer"),
            Case("FR6", f"tail file length {value}", craft.build(raw(), tail_file_length=value), LayoutError,
                 f"trailer says the file has {value} bytes", "trailer"),
            Case("FR6", f"safetensors length prefix {value}", edit(raw(), stream_prefix(value)), LayoutError,
                 f"safetensors header length {value} disagrees", "safetensors header"),
        ]
    for value in (1 << 63, U64_MAX):
        cases += [
            Case("FR6", f"header file_length {value}",
                 edit(raw(), set_in(lambda p: p.header, file_length=value), fix_file_length=False),
                 HeaderError, "file_length: .* not a non-negative 63-bit integer"),
            Case("FR6", f"section offset {value}", edit(raw(), set_in(lambda p: p.section(), offset=value)),
                 HeaderError, r"sections\[0\].offset: .* not a non-negative 63-bit"),
            Case("FR6", f"section length {value}", edit(raw(), set_in(lambda p: p.section(), length=value)),
                 HeaderError, r"sections\[0\].length: .* not a non-negative 63-bit"),
            Case("FR6", f"stream length {value}",
                 edit(raw(), set_in(lambda p: p.section()["stream"], length=value)),
                 HeaderError, r"stream.length: .* not a non-negative 63-bit"),
        ]
    big = (1 << 63) - 4096  # aligned, in range, absurd
    cases += [
        Case("FR6", "section offset 2**63-4096", edit(raw(), lambda p: p.section().update(offset=big)), LayoutError,
             "padding before it", "section 'model'"),
        Case("FR6", "section length 2**63-1", edit(raw(), lambda p: p.section().update(length=(1 << 63) - 1)),
             LayoutError, r"trailer index at \d+ does not follow the data \(ends 9223372036854779903\)", "trailer"),
        Case("FR6", "zstd section length 2**63-1", edit(zst(), lambda p: p.section().update(length=(1 << 63) - 1)),
             LayoutError, "does not follow the data", "trailer"),
    ]
    return cases


def test_FR6_length_overflow(tmp_path: Path) -> None:
    run(case_A6(), tmp_path)


def test_FR6_header_length_overflow_allocates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "big.mfmt"
    path.write_bytes(craft.build(raw(), header_length=U64_MAX))
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceededError) as info:
            mettaformat.open(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.value == U64_MAX and info.value.limit == MAX_HEADER_SIZE
    assert peak < 1 << 20


def _sparse(path: Path, size: int, chunks: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in chunks:
            f.seek(offset)
            f.write(data)


def test_FR7_lengths_within_the_file_but_above_the_caps(tmp_path: Path) -> None:
    """Sparse files, so that the declared length really fits inside the file."""
    good = base("raw")
    parts = craft.parse(good)
    # header length above MAX_HEADER_SIZE, file bigger than that
    path = tmp_path / "big-header.mfmt"
    size = MAX_HEADER_SIZE + (1 << 20)
    preamble = craft.build(parts, header_length=MAX_HEADER_SIZE + 1)[:32]
    _sparse(path, size, [(0, preamble), (size - 32, craft.TAIL.pack(0, 0, size, craft.END_MAGIC))])
    with pytest.raises(LimitExceededError, match=f"header length {MAX_HEADER_SIZE + 1} exceeds the limit"):
        full_load(path)
    # trailer index above MAX_INDEX_SIZE, file bigger than that
    path = tmp_path / "big-index.mfmt"
    size = MAX_INDEX_SIZE + (2 << 20)
    tail = craft.TAIL.pack(MAX_INDEX_SIZE + 1, 0, size, craft.END_MAGIC)
    _sparse(path, size, [(0, good[:4096]), (size - 32, tail)])
    with pytest.raises(LimitExceededError, match=f"trailer index length {MAX_INDEX_SIZE + 1} exceeds") as info:
        full_load(path)
    assert info.value.region == "trailer"


@builder
def case_A7() -> list[Case]:
    """Caps that fit a small file: the embedded safetensors header length."""
    return [
        Case("FR7", "stream header length above 100 MB",
             edit(raw(), lambda p: p.section()["stream"].update(header_length=100_000_064)), HeaderError,
             r"stream.header_length: 100000064 is not a multiple of 64 in \(8, 100000008\]"),
    ]


def test_FR7_stream_header_cap(tmp_path: Path) -> None:
    run(case_A7(), tmp_path)


@builder
def case_A8() -> list[Case]:
    good = base("raw")
    eocd = b"PK\x05\x06" + b"\x00" * 18
    header_end = 32 + struct.unpack_from("<Q", good, 16)[0]
    in_padding = bytearray(good)
    in_padding[header_end + 100] = 0x41

    def extra_after_stream(p: craft.Parts) -> None:
        p.blobs[0][1] += b"POLYGLOT" * 2
        p.section()["length"] += 16

    def extra_after_frames(p: craft.Parts) -> None:
        p.blobs[0][1] += b"POLYGLOT" * 2
        p.section()["length"] += 16

    return [
        Case("FR8", "zip end record appended", good + eocd, LayoutError, "end magic missing", "trailer"),
        Case("FR8", "second tail appended", good + good[-32:], LayoutError, "trailer says the file has", "trailer"),
        Case("FR8", "junk before the index", craft.build(raw(), gap=b"JUNK"), IntegrityError,
             "non-zero bytes in padding", "padding"),
        Case("FR8", "junk in the header padding", bytes(in_padding), IntegrityError, "non-zero bytes in padding",
             "padding"),
        Case("FR8", "2 MiB of zeros before the index", craft.build(raw(), gap=bytes(2 << 20)), LayoutError,
             "does not follow the data", "trailer"),
        Case("FR8", "bytes after the raw stream", edit(raw(), extra_after_stream), LayoutError,
             "raw section length .* differs from its stream length"),
        Case("FR8", "bytes after the last frame", edit(zst(), extra_after_frames), LayoutError,
             "frames cover .* bytes of a .*-byte section", "frame table"),
    ]


def test_FR8_trailing_and_interstitial_bytes(tmp_path: Path) -> None:
    run(case_A8(), tmp_path)


@builder
def case_A9() -> list[Case]:
    def short_blob(p: craft.Parts) -> None:
        del p.blobs[0][1][-2:]

    def short_section(p: craft.Parts) -> None:
        del p.blobs[0][1][-2:]
        p.section()["length"] -= 2

    def short_last_frame(p: craft.Parts) -> None:
        frames = p.frames()
        f, r, flt = frames[-1]
        p.set_frames([*frames[:-1], (f[:-2], r, flt)])

    return [
        Case("FR9", "raw section 2 bytes short", edit(raw(), short_blob), LayoutError,
             "trailer index at .* does not follow the data", "trailer"),
        Case("FR9", "raw section and its length 2 bytes short", edit(raw(), short_section), LayoutError,
             "raw section length .* differs"),
        Case("FR9", "zstd section 2 bytes short", edit(zst(), short_blob), LayoutError, "does not follow the data"),
        Case("FR9", "last zstd frame 2 bytes short", edit(zst(), short_last_frame), CodecError, "truncated",
             r"section 'model' frame \d"),
    ]


def test_FR9_data_shorter_than_declared(tmp_path: Path) -> None:
    run(case_A9(), tmp_path)


def test_FR10_file_truncated_or_extended_after_open(tmp_path: Path) -> None:
    path = tmp_path / "live.mfmt"
    mettaformat.save_file({"a": torch.randn(5000), "b": torch.randn(5000)}, path)
    with mettaformat.open(path) as ckpt:
        with open(path, "r+b") as f:
            f.truncate(4096)
        with pytest.raises(LayoutError, match=r"changed size from \d+ to 4096 while open") as info:
            ckpt.get_tensor("a")
        assert info.value.region == "file"
    mettaformat.save_file({"a": torch.randn(5000), "b": torch.randn(5000)}, path)
    with mettaformat.open(path) as ckpt:
        ckpt.get_tensor("a")  # the mapping now exists
        with open(path, "ab") as f:
            f.write(b"\0" * 8192)
        with pytest.raises(LayoutError, match="changed size"):
            ckpt.get_tensor("b")
        with pytest.raises(LayoutError, match="changed size"):
            ckpt.verify_structure()


def test_FR10_file_replaced_after_open_keeps_reading_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "live.mfmt"
    a = torch.randn(5000)
    mettaformat.save_file({"a": a}, path)
    with mettaformat.open(path) as ckpt:
        mettaformat.save_file({"a": torch.zeros(10)}, path)  # atomic rename: new inode
        assert torch.equal(ckpt.get_tensor("a"), a)


@builder
def case_A11() -> list[Case]:
    good = base("raw")
    # A header length whose bytes are pickle STACK_GLOBAL, STOP.
    pickle_length = good[:16] + b"\x93." + b"\x00" * 6 + good[24:]
    # Our magic, then a pickle that would run a command if anything unpickled it.
    evil = b"cos\nsystem\n(S'touch /tmp/mfmt-A11-canary'\ntR."
    magic_then_pickle = craft.MAGIC + evil + b"\x00" * 32
    # A valid zip local-header signature after our magic.
    return [
        Case("FR11", "header length that is a pickle", pickle_length, LayoutError, "runs past the end", "preamble"),
        Case("FR11", "magic then a pickle", magic_then_pickle, UnsupportedVersionError, "not supported",
             "preamble"),
        Case("FR11", "pickle without our magic", b"\x80\x02" + evil + b"\x00" * 32, BadMagicError,
             "not a mettaformat file"),
        Case("FR11", "valid file with a zip appended", good + b"PK\x03\x04" + b"\x00" * 26 + b"PK\x05\x06" +
             b"\x00" * 18, LayoutError, "end magic missing"),
    ]


def test_FR11_one_router_our_magic_wins(tmp_path: Path) -> None:
    canary = Path("/tmp/mfmt-A11-canary")
    canary.unlink(missing_ok=True)
    before = set(sys.modules)
    run(case_A11(), tmp_path)
    assert not canary.exists()
    assert not {m for m in set(sys.modules) - before if "legacy" in m or m in ("zipfile", "tarfile")}


# -- B. tensor table -------------------------------------------------------------------------------
def _offsets(p: craft.Parts, name: str) -> list[int]:
    return p.tensor(name)["offsets"]  # type: ignore[no-any-return]


@builder
def case_B1() -> list[Case]:
    def tied(p: craft.Parts) -> None:
        p.tensor("y")["offsets"] = list(_offsets(p, "x"))

    def partial(p: craft.Parts) -> None:
        b, e = _offsets(p, "y")
        p.tensor("y")["offsets"] = [b - 4, e - 4]

    def zstd_tied(p: craft.Parts) -> None:
        p.tensor("y")["offsets"] = list(_offsets(p, "x"))

    return [
        Case("TT1", "identical ranges (tied)", edit(raw(), tied), LayoutError, "overlaps the previous tensor",
             "section 'model'"),
        Case("TT1", "partial overlap", edit(raw(), partial), LayoutError, "overlaps the previous tensor"),
        Case("TT1", "identical ranges, zstd", edit(zst(), zstd_tied), LayoutError, "overlaps"),
    ]


def test_TT1_overlapping_tensors(tmp_path: Path) -> None:
    run(case_B1(), tmp_path)


@builder
def case_B2() -> list[Case]:
    def hole(p: craft.Parts) -> None:  # c is last in data order (smallest item size)
        b, e = _offsets(p, "c")
        p.tensor("c")["offsets"] = [b + 4, e + 4]
        p.section()["stream"]["length"] += 4

    def hole_at_end(p: craft.Parts) -> None:
        p.section()["stream"]["length"] += 8

    return [
        Case("TT2", "hole between tensors", edit(raw(), hole), LayoutError, "leaves a hole after offset"),
        Case("TT2", "hole at the end", edit(raw(), hole_at_end), LayoutError, r"tensors cover \d+ bytes of a"),
    ]


def test_TT2_holes(tmp_path: Path) -> None:
    run(case_B2(), tmp_path)


@builder
def case_B3() -> list[Case]:
    def offsets(value: Any) -> Callable[[craft.Parts], None]:
        return lambda p: p.tensor("a").update(offsets=value)

    def reversed_(p: craft.Parts) -> None:
        b, e = _offsets(p, "a")
        p.tensor("a")["offsets"] = [e, b]

    def beyond(p: craft.Parts) -> None:
        b, e = _offsets(p, "c")
        p.tensor("c").update(shape=[5, 6], offsets=[b, e + 10])

    path = r"tensors\[\d\]\.offsets"
    return [
        Case("TT3", "begin > end", edit(raw(), reversed_), HeaderError, path + r": \[\d+, \d+\] holds -256 bytes"),
        Case("TT3", "end beyond the data", edit(raw(), beyond), LayoutError, "tensors cover 644 bytes of a 634"),
        Case("TT3", "negative", edit(raw(), offsets([-4, 252])), HeaderError, path + ": expected .* non-negative"),
        Case("TT3", "floats", edit(raw(), offsets([0.0, 256.0])), HeaderError, path),
        Case("TT3", "strings", edit(raw(), offsets(["0", "256"])), HeaderError, path),
        Case("TT3", "bools", edit(raw(), offsets([False, True])), HeaderError, path),
        Case("TT3", "three numbers", edit(raw(), offsets([0, 256, 512])), HeaderError, path),
        Case("TT3", "2**63", edit(raw(), offsets([1 << 63, (1 << 63) + 256])), HeaderError, path),
        Case("TT3", "a map", edit(raw(), offsets({"begin": 0})), HeaderError, path + ": expected list"),
    ]


def test_TT3_bad_offsets(tmp_path: Path) -> None:
    run(case_B3(), tmp_path)


@builder
def case_B4() -> list[Case]:
    return [
        Case("TT4", f"shape {shape}", edit(raw(), set_in(lambda p: p.tensor("a"), shape=shape)), HeaderError,
             r"tensors\[\d\]\.shape(\[\d\])?: (tensor size overflows the 4611686018427387904-byte limit|"
             r"dimension \d+ is not an integer in \[0, 2\^63\))")
        for shape in ([2, U64_MAX - 1], [2, (1 << 63) - 1], [1 << 32, 1 << 32], [1 << 20] * 5, [0, U64_MAX],
                      [0, 1 << 62, 1 << 62])
    ]


def test_TT4_shape_product_overflow(tmp_path: Path) -> None:
    run(case_B4(), tmp_path)


@builder
def case_B5() -> list[Case]:
    return [
        Case("TT5", f"dim {dim!r}", edit(raw(), set_in(lambda p: p.tensor("a"), shape=[dim])), HeaderError,
             r"shape\[0\]: dimension .* is not an integer in \[0, 2\^63\)")
        for dim in (-1, -(1 << 63), 64.0, True, "64", None, [64])
    ] + [Case("TT5", "shape not a list", edit(raw(), lambda p: p.tensor("a").update(shape=64)), HeaderError,
              r"\.shape: expected list, found int")]


def test_TT5_bad_dimensions(tmp_path: Path) -> None:
    run(case_B5(), tmp_path)


@pytest.mark.parametrize("compression", ["raw", "zstd"])
def test_TT6_zero_size_and_scalar_tensors_are_accepted(tmp_path: Path, compression: str) -> None:
    tensors = {
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 5),
        "zero_mid": torch.zeros(3, 0, 2, dtype=torch.int64),
        "w": torch.randn(4),
    }
    path = tmp_path / "b6.mfmt"
    mettaformat.save_file(tensors, path, compression=compression)  # type: ignore[arg-type]
    loaded = full_load(path)
    for name, t in tensors.items():
        got = loaded[f"model/{name}"]
        assert got.shape == t.shape and got.dtype == t.dtype and torch.equal(got, t)


@builder
def case_B7() -> list[Case]:
    def many_tensors(p: craft.Parts) -> None:
        p.section()["tensors"] = [0] * (MAX_TENSORS_PER_SECTION + 1)  # 1 MB of header

    def many_sections(p: craft.Parts) -> None:
        p.header["sections"] = [0] * (MAX_SECTIONS + 1)

    return [
        Case("TT7", "rank 65", edit(raw(), lambda p: p.tensor("a").update(shape=[1] * (MAX_RANK + 1))),
             LimitExceededError, f"tensor rank {MAX_RANK + 1} exceeds the limit {MAX_RANK}"),
        Case("TT7", "10**6 + 1 tensors", edit(raw(), many_tensors), LimitExceededError,
             f"tensor count {MAX_TENSORS_PER_SECTION + 1} exceeds the limit"),
        Case("TT7", "65 sections", edit(raw(), many_sections), LimitExceededError,
             f"section count {MAX_SECTIONS + 1} exceeds the limit {MAX_SECTIONS}"),
        Case("TT7", "4097-byte name", edit(raw(), lambda p: p.tensor("a").update(name="n" * 4097)), HeaderError,
             "invalid tensor name .*4096 bytes"),
        Case("TT7", "4097-byte section name", edit(raw(), lambda p: p.section().update(name="s" * 4097)),
             HeaderError, "section name must be 1 to 4096 bytes"),
    ]


def test_TT7_counts_and_rank_above_caps(tmp_path: Path) -> None:
    run(case_B7(), tmp_path)


def test_TT7_many_names_parse_in_linear_time(tmp_path: Path) -> None:
    """50k alias entries (under the cap): the duplicate-name check must not be quadratic."""
    parts = raw()
    parts.section()["tensors"] += [{"name": f"alias{i}", "alias": "a"} for i in range(50_000)]
    path = tmp_path / "aliases.mfmt"
    path.write_bytes(craft.build(parts))
    start = time.perf_counter()
    with mettaformat.open(path) as ckpt:
        assert len(ckpt.keys()) == 50_005
    assert time.perf_counter() - start < 5  # quadratic took minutes


@builder
def case_B8() -> list[Case]:
    return [
        Case("TT8", f"dtype {tag!r}", edit(raw(), set_in(lambda p: p.tensor("a"), dtype=tag)), HeaderError,
             match)
        for tag, match in (
            ("F8_E8M0", r"dtype: unknown dtype 'F8_E8M0'; this reader knows"),
            ("F4", "unknown dtype 'F4'"),
            ("f32", "unknown dtype 'f32'"),
            ("", "unknown dtype ''"),
            (5, r"\.dtype: expected str, found int"),
        )
    ]


def test_TT8_unknown_dtype(tmp_path: Path) -> None:
    run(case_B8(), tmp_path)


@builder
def case_B9() -> list[Case]:
    return [
        Case("TT9", "shape one short", edit(raw(), lambda p: p.tensor("a").update(shape=[63])), HeaderError,
             r"offsets: \[\d+, \d+\] holds 256 bytes, shape and dtype need 252"),
        Case("TT9", "dtype twice as wide", edit(raw(), lambda p: p.tensor("a").update(dtype="F64")), HeaderError,
             "holds 256 bytes, shape and dtype need 512"),
        Case("TT9", "sub-byte dtype", edit(raw(), lambda p: p.tensor("a").update(dtype="U4", shape=[512])),
             HeaderError, "unknown dtype 'U4'"),
    ]


def test_TT9_size_disagrees_with_shape_and_dtype(tmp_path: Path) -> None:
    run(case_B9(), tmp_path)


@builder
def case_B10() -> list[Case]:
    def dup(p: craft.Parts) -> None:
        p.tensor("y")["name"] = "x"

    def alias_dup(p: craft.Parts) -> None:
        p.section()["tensors"].append({"name": "a", "alias": "b"})

    def dup_section(p: craft.Parts) -> None:
        p.header["sections"].append(dict(p.section()))

    return [
        Case("TT10", "two tensors named x", edit(raw(), dup), HeaderError, r"name: duplicate tensor name 'x'"),
        Case("TT10", "alias named like a tensor", edit(raw(), alias_dup), HeaderError, "duplicate tensor name 'a'"),
        Case("TT10", "two sections named model", edit(raw(), dup_section), HeaderError, "duplicate section names"),
    ]


def test_TT10_duplicate_names(tmp_path: Path) -> None:
    run(case_B10(), tmp_path)


@builder
def case_B11() -> list[Case]:
    def rename(value: Any) -> Callable[[craft.Parts], None]:
        return lambda p: p.tensor("a").update(name=value)

    def non_utf8(p: craft.Parts) -> bytes:
        return header_with(p, b"\xa3a\xff\xfe", lambda h: p.tensor("a").update(name="@@MARK@@"))

    def alias_to_nothing(p: craft.Parts) -> None:
        p.section()["tensors"].append({"name": "tied", "alias": "missing"})

    parts = raw()
    return [
        Case("TT11", "empty", edit(raw(), rename("")), HeaderError, "invalid tensor name ''"),
        Case("TT11", "NUL", edit(raw(), rename("a\x00b")), HeaderError, r"invalid tensor name 'a\\x00b'"),
        Case("TT11", "__metadata__", edit(raw(), rename("__metadata__")), HeaderError,
             "invalid tensor name '__metadata__'"),
        Case("TT11", "bin instead of str", edit(raw(), rename(b"a")), HeaderError, r"name: expected str, found bytes"),
        Case("TT11", "invalid UTF-8", craft.build(parts, header_bytes=non_utf8(parts)), HeaderError,
             "invalid msgpack", "header"),
        Case("TT11", "alias to a missing tensor", edit(raw(), alias_to_nothing), HeaderError,
             "alias 'tied' points to 'missing', which is not a stored tensor"),
    ]


def test_TT11_invalid_names(tmp_path: Path) -> None:
    run(case_B11(), tmp_path)


@builder
def case_B12() -> list[Case]:
    def misaligned(p: craft.Parts) -> None:
        b, e = _offsets(p, "a")
        p.tensor("a")["offsets"] = [b + 2, e + 2]

    def section_off_page(p: craft.Parts) -> None:
        p.blobs[0][0] += 512
        p.section()["offset"] += 512

    def stream_header_off_64(p: craft.Parts) -> None:
        p.section()["stream"]["header_length"] += 8

    return [
        Case("TT12", "F32 tensor at an odd offset", edit(raw(), misaligned), HeaderError,
             "begin .* is not aligned to the 4-byte element size"),
        Case("TT12", "section not on a page", edit(raw(), section_off_page), LayoutError,
             "offset 4608 is not aligned to 4096", "section 'model'"),
        Case("TT12", "data region not on 64 bytes", edit(raw(), stream_header_off_64), HeaderError,
             "header_length: .* is not a multiple of 64"),
    ]


def test_TT12_misaligned_data(tmp_path: Path) -> None:
    run(case_B12(), tmp_path)


@pytest.mark.parametrize("compression", ["raw", "zstd"])
def test_TT13_nan_and_inf_are_data(tmp_path: Path, compression: str) -> None:
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45])
    tensors = {"f32": special, "f16": special.half(), "bf16": special.bfloat16(), "f64": special.double()}
    path = tmp_path / "nan.mfmt"
    mettaformat.save_file(tensors, path, compression=compression)  # type: ignore[arg-type]
    loaded = full_load(path)
    for name, t in tensors.items():
        got = loaded[f"model/{name}"]
        assert got.dtype == t.dtype and got.shape == t.shape
        assert bytes(got.view(torch.uint8).numpy()) == bytes(t.view(torch.uint8).numpy())


# -- C. msgpack header -----------------------------------------------------------------------------
def _raw_header_case(row: str, label: str, value: bytes, exc: type[MettaFormatError], match: str,
                     where: Callable[[craft.Parts], Callable[[dict[str, Any]], None]] | None = None) -> Case:
    parts = raw()
    hb = header_with(parts, value, (where or (lambda p: set_metadata("@@MARK@@")))(parts))
    return Case(row, label, craft.build(parts, header_bytes=hb), exc, match, "header")


@builder
def case_C1() -> list[Case]:
    return [
        _raw_header_case("MD1", "1025 nested arrays", nested(1025), HeaderError, "invalid msgpack"),
        _raw_header_case("MD1", "1025 nested maps", nested(1025, b"\xc0", b"\x81\xa1k")[:-1] + b"\xa1k\xc0",
                         HeaderError, "invalid msgpack"),
        _raw_header_case("MD1", "100000 nested arrays", nested(100_000), HeaderError, "invalid msgpack"),
    ]


def test_MD1_deep_nesting(tmp_path: Path) -> None:
    run(case_C1(), tmp_path)


def test_MD1_nesting_under_msgpack_limit_but_over_tree_depth(tmp_path: Path) -> None:
    """1000 levels decode as msgpack; the object-tree decoder stops at MAX_TREE_DEPTH."""
    parts = raw()
    path = tmp_path / "deep.mfmt"
    path.write_bytes(craft.build(parts, header_bytes=header_with(parts, nested(1000), set_metadata("@@MARK@@"))))
    with mettaformat.open(path) as ckpt:
        assert torch.equal(ckpt.get_tensor("a"), _tensors()["a"])
        with pytest.raises(HeaderError, match=f"object tree deeper than {MAX_TREE_DEPTH}"):
            ckpt.metadata  # noqa: B018


@builder
def case_C2() -> list[Case]:
    return [
        _raw_header_case("MD2", label, value, HeaderError, f"invalid msgpack: .*({limit}|incomplete input)")
        for label, value, limit in (
            ("array32 of 2**32-1", b"\xdd\xff\xff\xff\xff", "max_array_len"),
            ("map32 of 2**32-1", b"\xdf\xff\xff\xff\xff", "max_map_len"),
            ("str32 of 2**32-1", b"\xdb\xff\xff\xff\xff", "max_str_len"),
            ("bin32 of 2**32-1", b"\xc6\xff\xff\xff\xff", "max_bin_len"),
        )
    ]


def test_MD2_huge_declared_container_lengths(tmp_path: Path) -> None:
    cases = case_C2()
    run(cases, tmp_path)
    path = tmp_path / "c2.mfmt"
    path.write_bytes(cases[0].data)
    tracemalloc.start()
    try:
        with pytest.raises(HeaderError):
            mettaformat.open(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@builder
def case_C3() -> list[Case]:
    parts = raw()
    top = craft.header_with_extra_pair(parts.header, craft.pack("checksum"), craft.pack("xxh3-64"))
    meta = craft.map_pairs([(craft.pack("epoch"), craft.pack(1)), (craft.pack("epoch"), craft.pack(2))])
    return [
        Case("MD3", "duplicate top-level key", craft.build(parts, header_bytes=top), HeaderError,
             "duplicate map key 'checksum'", "header"),
        _raw_header_case("MD3", "duplicate key in metadata", meta, HeaderError, "duplicate map key 'epoch'"),
    ]


def test_MD3_duplicate_keys(tmp_path: Path) -> None:
    run(case_C3(), tmp_path)


@builder
def case_C4() -> list[Case]:
    parts = raw()
    return [
        Case("MD4", f"{label} key", craft.build(parts, header_bytes=craft.header_with_extra_pair(
            parts.header, key, craft.pack(1))), HeaderError, match, "header")
        for label, key, match in (
            ("int", craft.pack(1), "map key 1 is not a string|strict_map_key"),
            ("bin", craft.pack(b"file_length"), "map key b'file_length' is not a string"),
            ("nil", b"\xc0", "invalid msgpack|not a string"),
            ("float", craft.pack(1.5), "invalid msgpack|not a string"),
        )
    ]


def test_MD4_non_string_keys(tmp_path: Path) -> None:
    run(case_C4(), tmp_path)


@builder
def case_C5() -> list[Case]:
    return [
        _raw_header_case("MD5", "ext 5", b"\xd4\x05\x01", HeaderError, "msgpack ext type 5 is not allowed"),
        _raw_header_case("MD5", "timestamp", b"\xd6\xff\x00\x00\x00\x01", HeaderError,
                         r"ext type -1 \(timestamp\) is not allowed"),
        _raw_header_case("MD5", "timestamp96", b"\xc7\x0c\xff" + b"\x00" * 12, HeaderError, "ext type -1"),
        _raw_header_case("MD5", "bad timestamp", b"\xd5\xff\x00\x00", HeaderError, "invalid msgpack"),
        _raw_header_case("MD5", "timestamp in a list", b"\x91\xd6\xff\x00\x00\x00\x01", HeaderError,
                         "ext type -1"),
        _raw_header_case("MD5", "ext 127 (fixext16)", b"\xd8\x7f" + b"\x00" * 16, HeaderError, "ext type 127"),
    ]


def test_MD5_ext_types(tmp_path: Path) -> None:
    run(case_C5(), tmp_path)


@builder
def case_C6() -> list[Case]:
    return [
        _raw_header_case("MD6", "invalid UTF-8 value", b"\xa2\xff\xfe", HeaderError, "invalid msgpack: .*utf"),
        _raw_header_case("MD6", "surrogate", b"\xa3\xed\xa0\x80", HeaderError, "invalid msgpack"),
        _raw_header_case("MD6", "invalid UTF-8 key", b"\x81\xa2\xc3\x28\x01", HeaderError, "invalid msgpack"),
    ]


def test_MD6_invalid_utf8(tmp_path: Path) -> None:
    run(case_C6(), tmp_path)


@builder
def case_C7() -> list[Case]:
    parts = raw()
    hb = craft.pack(parts.header)
    return [
        Case("MD7", "one trailing byte", craft.build(parts, header_bytes=hb + b"\xc0"), HeaderError,
             "1 trailing bytes after the msgpack value", "header"),
        Case("MD7", "a second header", craft.build(parts, header_bytes=hb + hb), HeaderError,
             f"{len(hb)} trailing bytes", "header"),
    ]


def test_MD7_trailing_bytes(tmp_path: Path) -> None:
    run(case_C7(), tmp_path)


@builder
def case_C8() -> list[Case]:
    parts = raw()
    hb = craft.pack(parts.header)
    return [
        Case("MD8", f"header cut to {n}", craft.build(parts, header_bytes=hb[:n]), HeaderError,
             "invalid msgpack: .*(incomplete input|exceeds max_)", "header")
        for n in (1, len(hb) // 2, len(hb) - 1)
    ]


def test_MD8_truncated_msgpack(tmp_path: Path) -> None:
    run(case_C8(), tmp_path)


@builder
def case_C9() -> list[Case]:
    def update(**kw: Any) -> Callable[[craft.Parts], None]:
        return lambda p: p.header.update(**kw)

    def drop(key: str) -> Callable[[craft.Parts], None]:
        return lambda p: p.header.pop(key)

    def checksum_len(p: craft.Parts) -> None:
        p.tensor("a")["checksum"] = b"\x00" * 7

    def index_schema(p: craft.Parts) -> None:
        p.index["sections"][0]["tensors"][0]["shape"] = "oops"

    parts = raw()
    as_list = craft.pack([1, 2, 3])
    cases = [
        Case("MD9", "file_length str", edit(raw(), update(file_length="5000"), fix_file_length=False), HeaderError,
             "header.file_length: expected int, found str"),
        Case("MD9", "file_length float", edit(raw(), update(file_length=5000.0), fix_file_length=False),
             HeaderError, "header.file_length: expected int, found float"),
        Case("MD9", "file_length bool", edit(raw(), update(file_length=True), fix_file_length=False), HeaderError,
             "header.file_length: expected int, found bool"),
        Case("MD9", "file_length negative", edit(raw(), update(file_length=-1), fix_file_length=False),
             HeaderError, "header.file_length: -1 is not a non-negative"),
        Case("MD9", "sections a map", edit(raw(), update(sections={})), HeaderError,
             "header.sections: expected list, found dict"),
        Case("MD9", "section not a map", edit(raw(), update(sections=[5])), HeaderError,
             r"header.sections\[0\]: expected a map, found int"),
        Case("MD9", "checksum algorithm missing", edit(raw(), drop("checksum")), HeaderError,
             "header.checksum: required field missing"),
        Case("MD9", "checksum algorithm unknown", edit(raw(), update(checksum="md5")), HeaderError,
             "unknown checksum algorithm 'md5'"),
        Case("MD9", "tensor checksum 7 bytes", edit(raw(), checksum_len), HeaderError,
             r"tensors\[\d\]\.checksum: checksum must be 8 bytes, found 7"),
        Case("MD9", "codec missing", edit(raw(), lambda p: p.section().pop("codec")), HeaderError,
             r"sections\[0\].codec: required field missing"),
        Case("MD9", "codec unknown", edit(raw(), lambda p: p.section()["codec"].update(name="lz4")),
             UnknownCodecError, "unknown codec 'lz4'"),
        Case("MD9", "header is an array", craft.build(parts, header_bytes=as_list), HeaderError,
             "header: expected a map, found list"),
        Case("MD9", "trees not a map", edit(raw(), update(trees=[1])), HeaderError, "header.trees: expected dict"),
        Case("MD9", "trailer index schema", edit(raw(), index_schema, sync_index=False), HeaderError,
             r"^index.sections\[0\].tensors\[0\].shape: expected list"),
        Case("MD9", "trailer index not msgpack", craft.build(raw(), index_bytes=b"\xc1\xc1"), HeaderError,
             "invalid msgpack", "trailer index"),
    ]
    return cases


def test_MD9_schema_violations_name_the_field(tmp_path: Path) -> None:
    run(case_C9(), tmp_path)


def test_MD10_no_unpacker_reuse_and_pinned_msgpack() -> None:
    assert msgpack.version >= (1, 2, 1)  # GHSA-6v7p-g79w-8964
    source = (REPO / "mettaformat" / "container" / "strict_msgpack.py").read_text()
    assert "Unpacker(" not in source and "unpackb(" in source
    good = craft.pack({"k": [1, 2, {"z": b"\x00"}]})
    bad = [good[:-1], good + b"\x00", b"\xc1", b"\xdd\xff\xff\xff\xff", b"\xd4\x05\x01", nested(2000)]
    for _ in range(50):  # failures leave no state behind that breaks the next parse
        for b in bad:
            with pytest.raises(HeaderError):
                decode_msgpack(b, region="header")
        assert decode_msgpack(good, region="header") == {"k": [1, 2, {"z": b"\x00"}]}


# -- D. zstd sections ------------------------------------------------------------------------------
def splice(name: str, frames: list[tuple[bytes, int, int]], parts: craft.Parts | None = None) -> bytes:
    """The zstd base file with tensor ``name``'s frames replaced."""
    p = parts or zst()
    old = p.frames()
    idx = p.tensor_frame_indices(name)
    p.set_frames(old[: idx[0]] + frames + old[idx[-1] + 1 :])
    return craft.build(p)


def frame_of(name: str) -> tuple[bytes, int, int]:
    p = zst()
    (i,) = p.tensor_frame_indices(name)
    return p.frames()[i]


def a_bytes() -> bytes:
    return bytes(_tensors()["a"].numpy().tobytes())


@functools.cache
def bomb() -> bytes:
    """16 MiB of zeros at level 19: about 500 bytes (ratio above 30000:1)."""
    return zstandard.ZstdCompressor(level=19, write_checksum=True).compress(bytes(16 << 20))


FR = r"section 'model' frame \d+"


@builder
def case_D1() -> list[Case]:
    tera = 1 << 40
    return [
        Case("ZS1", "17-byte frame declaring 1 TiB", splice("a", [(craft.huge_declared_frame(tera), 256, 0)]),
             CodecError, "no content checksum", FR),
        Case("ZS1", "1 TiB frame with the checksum flag",
             splice("a", [(craft.huge_declared_frame(tera, checksum=True), 256, 0)]), CodecError,
             f"zstd frame declares {tera} bytes, the index 256", FR),
        Case("ZS1", "4 GiB - 1 in the frame table", splice("a", [(craft.huge_declared_frame(256, checksum=True),
                                                               (1 << 32) - 1, 0)]),
             LayoutError, "invalid lengths", "frame table"),
    ]


def test_ZS1_huge_declared_content_size(tmp_path: Path) -> None:
    run(case_D1(), tmp_path)
    path = tmp_path / "d1.mfmt"
    path.write_bytes(case_D1()[1].data)
    assert _peak_traced(path) < 1 << 20


def _peak_traced(path: Path) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(MettaFormatError):
            full_load(path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@builder
def case_D1_tensor_claims() -> list[Case]:
    """A tensor of 20000 x 64 MiB (1.3 TB) described by 20000 tiny frames: refused before allocating."""
    rlen = 64 << 20
    tiny = craft.huge_declared_frame(rlen, checksum=True)
    return [Case("ZS1", "20000 tiny frames claiming 1.3 TB", _claims_file(20_000, rlen, tiny), LayoutError,
                 f"frame 1: 21 compressed bytes cannot hold {rlen} raw bytes", "frame table")]


def test_ZS1_tensor_claiming_terabytes_from_tiny_frames(tmp_path: Path) -> None:
    (case,) = case_D1_tensor_claims()
    run([case], tmp_path)
    path = tmp_path / "claims.mfmt"
    path.write_bytes(case.data)
    assert _peak_traced(path) < 8 << 20


def _claims_file(count: int, rlen: int, tiny: bytes) -> bytes:
    """One zstd tensor 'w' (U8) of count x rlen bytes, each frame ``tiny``."""
    data = mettaformat.save({"w": torch.zeros(16, dtype=torch.uint8)}, compression="zstd")
    p = craft.parse(data)
    t = p.tensor("w")
    t["shape"] = [count * rlen]
    t["offsets"] = [0, count * rlen]
    p.section()["stream"]["length"] = p.section()["stream"]["header_length"] + count * rlen
    p.set_frames([p.frames()[0]] + [(tiny, rlen, 0)] * count)
    return craft.build(p)


@builder
def case_D2() -> list[Case]:
    frame = craft.zstd_frame(a_bytes(), content_size=False)
    assert zstandard.frame_content_size(frame) == -1
    return [Case("ZS2", "no content size", splice("a", [(frame, 256, 0)]), CodecError,
                 "does not declare its content size", FR)]


def test_ZS2_unknown_content_size(tmp_path: Path) -> None:
    run(case_D2(), tmp_path)


@builder
def case_D3() -> list[Case]:
    b = bomb()
    assert len(b) < 4096 and zstandard.frame_content_size(b) == 16 << 20
    lied = craft.rewrite_header(b, content_size=256)  # declares what the index expects
    return [
        Case("ZS3", "16 MiB bomb where 256 bytes are expected", splice("a", [(b, 256, 0)]), CodecError,
             f"declares {16 << 20} bytes, the index 256", FR),
        Case("ZS3", "16 MiB bomb declaring 256 bytes", splice("a", [(lied, 256, 0)]), CodecError,
             "zstd: |frame decoded to 256\\+ bytes", FR),
    ]


def test_ZS3_decompression_bomb(tmp_path: Path) -> None:
    cases = case_D3()
    run(cases, tmp_path)
    for case in cases:
        path = tmp_path / "d3.mfmt"
        path.write_bytes(case.data)
        assert _peak_traced(path) < 4 << 20


def _bomb_tensor_file() -> bytes:
    """A legitimate 16 MiB tensor of zeros stored as one level-19 frame."""
    data = mettaformat.save({"z": torch.zeros(16 << 20, dtype=torch.uint8)}, compression="zstd")
    p = craft.parse(data)
    p.set_frames([p.frames()[0], (bomb(), 16 << 20, 0)])
    return craft.build(p)


@builder
def case_D3_accepted() -> list[Case]:
    return [Case("ZS3", "legitimate 16 MiB bomb", _bomb_tensor_file(), None)]


def test_ZS3_a_bomb_that_matches_the_index_decodes_exactly(tmp_path: Path) -> None:
    (case,) = case_D3_accepted()
    loaded = expect(case, tmp_path)
    assert loaded is not None
    z = loaded["model/z"]
    assert z.shape == (16 << 20,) and not z.any()


def case_D4_streamed_frame() -> bytes:
    """A frame compressed with window_log=27 and no content size (a streaming compressor)."""
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27, write_checksum=1)
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj()
    streamed: bytes = cobj.compress(a_bytes()) + cobj.flush()
    assert zstandard.get_frame_parameters(streamed).window_size == 1 << 27
    return streamed


@builder
def case_D4() -> list[Case]:
    streamed = case_D4_streamed_frame()
    good = frame_of("a")[0]
    cases = [Case("ZS4", "window_log 27, streamed", splice("a", [(streamed, 256, 0)]), CodecError,
                  f"zstd window above the {MAX_ZSTD_WINDOW}-byte limit", FR)]
    for log in (27, 31):
        frame = craft.rewrite_header(good, window_log=log)  # everything else valid
        cases.append(Case("ZS4", f"window_log {log}", splice("a", [(frame, 256, 0)]), CodecError,
                          "zstd window above", FR))
    return cases


def test_ZS4_window_above_the_limit(tmp_path: Path) -> None:
    run(case_D4(), tmp_path)
    # Defence in depth: the decoder itself refuses such a window when it streams. (A frame that
    # declares its size decodes single-pass straight into the output and ignores the window
    # limit, so the header walk is what refuses those.)
    frame = case_D4_streamed_frame()
    reader = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW).stream_reader(frame)
    with pytest.raises(zstandard.ZstdError, match="too much memory"):
        reader.read(256)


@builder
def case_D5() -> list[Case]:
    f, rlen, _ = frame_of("a")
    half = craft.zstd_frame(a_bytes()[:128])
    return [
        Case("ZS5", "two concatenated frames", splice("a", [(half + craft.zstd_frame(a_bytes()[128:]), 256, 0)]),
             CodecError, "declares 128 bytes|data after the end", FR),
        Case("ZS5", "frame then a second frame", splice("a", [(f + half, rlen, 0)]), CodecError,
             "data after the end of the zstd frame", FR),
        Case("ZS5", "frame then a skippable frame", splice("a", [(f + craft.skippable_frame(), rlen, 0)]),
             CodecError, "data after the end", FR),
        Case("ZS5", "skippable frame first", splice("a", [(craft.skippable_frame(b"x" * 16) + f, rlen, 0)]),
             CodecError, "bad magic", FR),
        Case("ZS5", "trailing garbage", splice("a", [(f + b"GARBAGE", rlen, 0)]), CodecError, "data after the end",
             FR),
    ]


def test_ZS5_concatenated_skippable_and_trailing(tmp_path: Path) -> None:
    run(case_D5(), tmp_path)


@builder
def case_D6() -> list[Case]:
    data = a_bytes()
    short = craft.rewrite_header(craft.zstd_frame(data[:252]), content_size=256)
    long = craft.rewrite_header(craft.zstd_frame(data + b"\x00" * 8), content_size=256)
    return [
        Case("ZS6", "frame declares fewer bytes than the index", splice("a", [(craft.zstd_frame(data[:252]), 256, 0)]),
             CodecError, "declares 252 bytes, the index 256", FR),
        Case("ZS6", "declares 256, produces 252", splice("a", [(short, 256, 0)]), CodecError,
             "zstd: |decoded to", FR),
        Case("ZS6", "declares 256, produces 264", splice("a", [(long, 256, 0)]), CodecError, "zstd: |decoded to",
             FR),
    ]


def test_ZS6_declared_size_differs_from_produced(tmp_path: Path) -> None:
    run(case_D6(), tmp_path)


@builder
def case_D7() -> list[Case]:
    f, rlen, flt = frame_of("a")  # random floats: a raw block, so a flip reaches the checksum
    payload = bytearray(f)
    payload[len(f) // 2] ^= 0x01
    check = bytearray(f)
    check[-1] ^= 0x01
    no_checksum = craft.zstd_frame(a_bytes(), checksum=False)
    return [
        Case("ZS7", "bit flip in the payload", splice("a", [(bytes(payload), rlen, flt)]), CodecError, "zstd: ",
             FR),
        Case("ZS7", "bit flip in the checksum", splice("a", [(bytes(check), rlen, flt)]), CodecError, "zstd: ",
             FR),
        Case("ZS7", "frame without a checksum", splice("a", [(no_checksum, rlen, flt)]), CodecError,
             "zstd frame has no content checksum", FR),
    ]


def test_ZS7_content_checksum(tmp_path: Path) -> None:
    run(case_D7(), tmp_path)


@builder
def case_D8() -> list[Case]:
    words = ["alpha", "beta", "gamma", "delta"]
    samples: list[bytes | bytearray | memoryview] = [
        (" ".join(words[(i * j) % 4] for j in range(40)) + str(i)).encode() for i in range(300)
    ]
    dictionary = zstandard.train_dictionary(2048, samples)
    trained = zstandard.ZstdCompressor(dict_data=dictionary, write_checksum=True).compress(a_bytes())
    assert zstandard.get_frame_parameters(trained).dict_id == dictionary.dict_id() != 0
    hand_set = craft.rewrite_header(frame_of("a")[0], dict_id=0x1234)
    return [
        Case("ZS8", "trained dictionary", splice("a", [(trained, 256, 0)]), CodecError,
             "zstd frame requires a dictionary", FR),
        Case("ZS8", "hand-set dictionary id", splice("a", [(hand_set, 256, 0)]), CodecError, "requires a dictionary",
             FR),
    ]


def test_ZS8_dictionary_frames(tmp_path: Path) -> None:
    run(case_D8(), tmp_path)


@builder
def case_D9() -> list[Case]:
    f, rlen, flt = frame_of("a")

    def stream_header_frame(p: craft.Parts) -> None:
        frames = p.frames()
        h, r, fl = frames[0]
        p.set_frames([(b"\x00" * len(h), r, fl), *frames[1:]])

    return [
        Case("ZS9", "zeros", splice("a", [(b"\x00" * len(f), rlen, flt)]), CodecError, "not a zstd frame", FR),
        Case("ZS9", "LZ4 frame magic", splice("a", [(b"\x04\x22\x4d\x18" + f[4:], rlen, flt)]), CodecError,
             "bad magic", FR),
        Case("ZS9", "gzip", splice("a", [(b"\x1f\x8b\x08\x00" + f[4:], rlen, flt)]), CodecError, "bad magic", FR),
        Case("ZS9", "raw bytes in the stream header frame", edit(zst(), stream_header_frame), CodecError,
             "not a zstd frame", r"section 'model' frame 0"),
        Case("ZS9", "frame shorter than any zstd frame", splice("a", [(f[:12], rlen, flt)]), LayoutError,
             "invalid lengths", "frame table"),
        Case("ZS9", "unknown filter", splice("a", [(f, rlen, 7)]), LayoutError, r"invalid lengths or filter", "frame"),
    ]


def test_ZS9_not_a_zstd_frame(tmp_path: Path) -> None:
    run(case_D9(), tmp_path)


# -- E. integrity ----------------------------------------------------------------------------------
def _flip(data: bytes, offset: int, bit: int = 0x40) -> bytes:
    out = bytearray(data)
    out[offset] ^= bit
    return bytes(out)


@builder
def case_E1() -> list[Case]:
    cases = []
    for compression, parts in (("raw", raw()), ("zstd", zst())):
        good = base(compression)
        hl = struct.unpack_from("<Q", good, 16)[0]
        index_offset = len(good) - 32 - struct.unpack_from("<Q", good, len(good) - 32)[0]
        s = parts.section()
        cases += [
            Case("IN1", f"{compression}: header byte", _flip(good, 32 + hl // 2), IntegrityError,
                 "header checksum mismatch", "header"),
            Case("IN1", f"{compression}: header checksum", _flip(good, 24), IntegrityError,
                 "header checksum mismatch", "header"),
            Case("IN1", f"{compression}: index byte", _flip(good, index_offset + 5), IntegrityError,
                 "trailer index checksum mismatch", "trailer index"),
            Case("IN1", f"{compression}: index checksum", _flip(good, len(good) - 24), IntegrityError,
                 "trailer index checksum mismatch", "trailer index"),
            Case("IN1", f"{compression}: tail file length", _flip(good, len(good) - 16), LayoutError,
                 "trailer says", "trailer"),
            Case("IN1", f"{compression}: end magic", _flip(good, len(good) - 1), LayoutError, "end magic",
                 "trailer"),
            Case("IN1", f"{compression}: padding", _flip(good, 32 + hl + 1), IntegrityError, "non-zero bytes",
                 "padding"),
        ]
        if compression == "raw":
            cases.append(Case("IN1", "stream header", _flip(good, s["offset"] + 20), IntegrityError,
                              "safetensors header checksum mismatch", "section 'model'"))
            for name in _tensors():
                start, end = parts.tensor_span(name)
                cases.append(Case("IN1", f"tensor {name}", _flip(good, s["offset"] + (start + end) // 2),
                                  IntegrityError, f"checksum mismatch in tensor '{name}'", "section 'model'"))
        else:  # a flip inside a frame is caught by the frame's own checksum first
            pos = s["offset"]
            for i, (f, _, _) in enumerate(parts.frames()):
                cases.append(Case("IN1", f"zstd frame {i}", _flip(good, pos + len(f) // 2 + 2), CodecError,
                                  "zstd: |invalid zstd block|truncated|data after", f"section 'model' frame {i}"))
                pos += len(f)
    return cases


def test_IN1_flipped_byte_in_each_region(tmp_path: Path) -> None:
    run(case_E1(), tmp_path)


def test_IN1_every_preamble_byte(tmp_path: Path) -> None:
    """The preamble has no checksum of its own: every field is checked for what it means instead.

    A flip in the minor version or in the optional (high 16) flag bits is accepted by design:
    neither changes how this reader reads the file (a newer minor only warns).
    """
    good = base("raw")
    path = tmp_path / "p.mfmt"
    for offset in range(32):
        path.write_bytes(_flip(good, offset))
        if offset in (10, 11, 14, 15):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert torch.equal(full_load(path)["model/a"], _tensors()["a"])
            continue
        with pytest.raises(MettaFormatError) as info:
            full_load(path)
        expected = {range(0, 8): (BadMagicError,), range(8, 10): (UnsupportedVersionError,),
                    range(12, 14): (UnsupportedVersionError,),
                    range(16, 24): (LayoutError, LimitExceededError, IntegrityError),
                    range(24, 32): (IntegrityError,)}
        allowed = next(v for k, v in expected.items() if offset in k)
        assert type(info.value) in allowed, (offset, info.value)
        assert info.value.region in ("preamble", "header"), (offset, info.value)


@builder
def case_E2() -> list[Case]:
    def tensor_checksum(p: craft.Parts) -> None:
        c = bytearray(p.tensor("a")["checksum"])
        c[0] ^= 1
        p.tensor("a")["checksum"] = bytes(c)

    def stream_checksum(p: craft.Parts) -> None:
        p.section()["stream"]["header_checksum"] = b"\x00" * 8

    def index_disagrees(p: craft.Parts) -> None:
        p.index["sections"][0]["tensors"][0]["checksum"] = b"\x01" * 8

    cases = [
        Case("IN2", f"{codec}: tensor checksum altered", edit(parts, tensor_checksum), IntegrityError,
             "checksum mismatch in tensor 'a'", "section 'model'")
        for codec, parts in (("raw", raw()), ("zstd", zst()))
    ]
    return [
        *cases,
        Case("IN2", "tensor checksum missing", edit(raw(), lambda p: p.tensor("a").pop("checksum")), HeaderError,
             r"tensors\[\d\]\.checksum: required field missing"),
        Case("IN2", "tensor checksum not bytes", edit(raw(), lambda p: p.tensor("a").update(checksum=12345)),
             HeaderError, "checksum: expected bytes, found int"),
        Case("IN2", "algorithm empty", edit(raw(), lambda p: p.header.update(checksum="")), HeaderError,
             "unknown checksum algorithm ''"),
        Case("IN2", "algorithm none", edit(raw(), lambda p: p.header.update(checksum="none")), HeaderError,
             "unknown checksum algorithm 'none'"),
        Case("IN2", "stream header checksum zeroed", edit(raw(), stream_checksum), IntegrityError,
             "safetensors header checksum mismatch"),
        Case("IN2", "zstd stream header checksum zeroed", edit(zst(), stream_checksum), IntegrityError,
             "safetensors header checksum mismatch"),
        Case("IN2", "index disagrees with the header", edit(raw(), index_disagrees, sync_index=False),
             IntegrityError, "trailer index differs from the header's", "trailer index"),
        Case("IN2", "header checksum zero", craft.build(raw(), header_checksum=0), IntegrityError,
             "header checksum mismatch"),
        Case("IN2", "index checksum zero", craft.build(raw(), index_checksum=0), IntegrityError,
             "trailer index checksum mismatch"),
    ]


def test_IN2_checksum_fields_corrupted_missing_or_unknown(tmp_path: Path) -> None:
    run(case_E2(), tmp_path)


@builder
def case_E3() -> list[Case]:
    def swap_raw(p: craft.Parts) -> None:
        blob = p.blobs[0][1]
        (xs, xe), (ys, ye) = p.tensor_span("x"), p.tensor_span("y")
        blob[xs:xe], blob[ys:ye] = blob[ys:ye], blob[xs:xe]

    def swap_frames(p: craft.Parts) -> None:
        frames = p.frames()
        (i,), (j,) = p.tensor_frame_indices("x"), p.tensor_frame_indices("y")
        frames[i], frames[j] = frames[j], frames[i]
        p.set_frames(frames)

    return [
        Case("IN3", "raw bodies swapped", edit(raw(), swap_raw), IntegrityError, "checksum mismatch in tensor '[xy]'"),
        Case("IN3", "zstd frames swapped", edit(zst(), swap_frames), IntegrityError, "tensor '[xy]'"),
    ]


def test_IN3_swapped_tensor_bodies(tmp_path: Path) -> None:
    run(case_E3(), tmp_path)


# -- H. file system --------------------------------------------------------------------------------
def _open_with_watchdog(path: Path) -> tuple[BaseException | None, float]:
    """Open ``path``; if that blocks on a FIFO, a writer appears after 5 s to unblock it."""

    def unblock() -> None:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    timer = threading.Timer(5, unblock)
    timer.start()
    start = time.perf_counter()
    try:
        with mettaformat.open(path):
            pass
        err: BaseException | None = None
    except BaseException as e:
        err = e
    finally:
        timer.cancel()
    return err, time.perf_counter() - start


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_FS1_fifo_device_directory_and_symlinks_are_rejected_quickly(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.mfmt"
    os.mkfifo(fifo)
    link = tmp_path / "zero.mfmt"
    targets = [fifo, tmp_path]
    if Path("/dev/zero").exists():
        link.symlink_to("/dev/zero")
        targets += [Path("/dev/zero"), link]
    fifo_link = tmp_path / "fifo-link.mfmt"
    fifo_link.symlink_to(fifo)
    targets.append(fifo_link)
    for target in targets:
        err, elapsed = _open_with_watchdog(target)
        assert elapsed < 2, f"{target}: open blocked for {elapsed:.1f} s"
        assert type(err) is FormatError, (target, err)
        assert "not a regular file" in str(err) and err.region == "file"
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_FS2_partially_written_temp_file_is_rejected(tmp_path: Path) -> None:
    good = base("zstd")
    path = tmp_path / ".model.mfmt.tmp"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(LayoutError):
        full_load(path)


@pytest.mark.parametrize("compression", ["raw", "zstd"])
def test_FS4_file_rewritten_in_place_between_index_and_data_read(tmp_path: Path, compression: str) -> None:
    path = tmp_path / "h4.mfmt"
    path.write_bytes(base(compression))
    parts = craft.parse(base(compression))
    s = parts.section()
    with mettaformat.open(path) as ckpt:  # the index is read now
        assert torch.equal(ckpt.get_tensor("x"), _tensors()["x"])  # and the mapping exists
        with open(path, "r+b") as f:  # same size, other content
            if compression == "raw":
                start, _ = parts.tensor_span("a")
                f.seek(s["offset"] + start)
                f.write(torch.zeros(64).numpy().tobytes())
            else:  # a valid frame of other content, same length
                (i,) = parts.tensor_frame_indices("a")
                pos = s["offset"] + sum(len(fr) for fr, _, _ in parts.frames()[:i])
                f.seek(pos)
                frame, _, _ = parts.frames()[i]
                other = craft.zstd_frame(torch.zeros(64).numpy().tobytes())
                f.write(other + b"\x00" * (len(frame) - len(other)))
        with pytest.raises((IntegrityError, CodecError)) as info:
            ckpt.get_tensor("a")
        assert info.value.region == "section 'model'" or "frame" in str(info.value.region)
        with open(path, "ab") as f:  # and now a different size
            f.write(b"\x00")
        with pytest.raises(LayoutError, match="changed size"):
            ckpt.get_tensor("b")


# -- all of it again, in a fresh process under a timeout ---------------------------------------------
_CHILD = r"""
import json, re, resource, sys, time
from pathlib import Path
import torch, mettaformat
from mettaformat.errors import MettaFormatError

def full_load(path):
    with mettaformat.open(path) as ckpt:
        for section in ckpt.sections:
            ckpt.load_section(section)
        ckpt.verify_structure()
        ckpt.metadata

def status(key):
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))

def reset_peak():
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return status("VmRSS")
    except OSError:
        return None

manifest = json.loads(Path(sys.argv[1]).read_text())
full_load(manifest[0]["path"])  # warm up: pools, codecs
results = []
for item in manifest[1:]:
    before = reset_peak()
    start = time.perf_counter()
    try:
        full_load(item["path"])
        got = None
    except MettaFormatError as e:
        got = type(e).__name__
    except BaseException as e:
        got = "NOT A MettaFormatError: " + type(e).__name__ + ": " + str(e)[:200]
    seconds = time.perf_counter() - start
    growth = status("VmHWM") - before if before is not None else None
    results.append({"label": item["label"], "got": got, "seconds": seconds, "peak_growth_kib": growth})
print(json.dumps({"results": results}))
"""


def _all_cases() -> Iterator[Case]:
    for build in BUILDERS:
        yield from build()


def test_every_crafted_file_fails_fast_in_a_subprocess(tmp_path: Path) -> None:
    cases = list(_all_cases())
    rows = {c.row for c in cases}
    assert rows >= {f"FR{i}" for i in (1, 3, 4, 5, 6, 7, 8, 9, 11)} | {f"TT{i}" for i in range(1, 13) if i not in (6,)}
    warm = tmp_path / "warm.mfmt"
    warm.write_bytes(base("zstd"))
    manifest: list[dict[str, Any]] = [{"path": str(warm), "label": "warm-up"}]
    for i, case in enumerate(cases):
        path = tmp_path / f"{i}.mfmt"
        path.write_bytes(case.data)
        manifest.append({"path": str(path), "label": f"{case.row} {case.label}",
                         "exc": case.exc.__name__ if case.exc else None})
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "manifest.json")],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for item, result in zip(manifest[1:], report["results"], strict=True):
        assert result["got"] == item["exc"], result
        assert result["seconds"] < 2, result
        # Peak RSS growth per file (None where /proc cannot reset the peak). The legitimate
        # 16 MiB bomb needs its 16 MiB output plus a decoder window; hostile files need ~nothing.
        growth = result["peak_growth_kib"]
        limit_kib = (64 << 10) if item["exc"] is None else (16 << 10)
        assert growth is None or growth < limit_kib, result
