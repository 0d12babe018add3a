"""Damage is always detected; laziness and zero-copy hold; extraction is a real safetensors file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

import mettaformat
from mettaformat.constants import PREAMBLE_SIZE, TRAILER_TAIL_SIZE
from mettaformat.container.extract import extract_safetensors
from mettaformat.errors import IntegrityError, LayoutError, MettaFormatError

CODECS = ["raw", "zstd"]


def small_file(tmp_path: Path, compression: str) -> bytes:
    g = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(40, generator=g), "b": torch.randint(0, 9, (33,), generator=g),
               "c": torch.randn(5, 5, generator=g).half(), "tied": torch.empty(0)}
    path = tmp_path / "small.mfmt"
    mettaformat.save_file(tensors, path, metadata={"epoch": 2}, compression=compression)  # type: ignore[arg-type]
    return path.read_bytes()


def full_load(path: Path) -> dict[str, torch.Tensor]:
    with mettaformat.open(path) as ckpt:
        out = ckpt.load_section("model")
        ckpt.verify_structure()
        return out


@pytest.mark.parametrize("compression", CODECS)
def test_truncation_at_every_offset_is_rejected(tmp_path: Path, compression: str) -> None:
    data = small_file(tmp_path, compression)
    path = tmp_path / "cut.mfmt"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(MettaFormatError):
            full_load(path)


def regions(path: Path) -> dict[str, tuple[int, int]]:
    with mettaformat.open(path, verify=False) as ckpt:
        header_end = PREAMBLE_SIZE + ckpt.preamble.header_length
        s = ckpt.header.sections[0]
        out = {"preamble": (0, PREAMBLE_SIZE), "header": (PREAMBLE_SIZE, header_end),
               "padding": (header_end, s.offset), "trailer index": (ckpt.tail.index_offset, ckpt.file_size - 32),
               "trailer tail": (ckpt.file_size - TRAILER_TAIL_SIZE, ckpt.file_size)}
        if s.codec == "raw":
            data_start = s.offset + s.stream_header_length
            out["stream header"] = (s.offset, data_start)
            for t in s.tensors:
                if t.nbytes:
                    out[f"tensor {t.name}"] = (data_start + t.begin, data_start + t.end)
        else:
            out["frames"] = (s.offset, s.end)
        return out


@pytest.mark.parametrize("compression", CODECS)
def test_a_flipped_byte_in_any_region_is_detected(tmp_path: Path, compression: str) -> None:
    data = small_file(tmp_path, compression)
    path = tmp_path / "flip.mfmt"
    path.write_bytes(data)
    spans = regions(path)
    for name, (start, end) in spans.items():
        assert end > start, name
        for offset in sorted({start, (start + end) // 2, end - 1}):
            damaged = bytearray(data)
            damaged[offset] ^= 0x40
            path.write_bytes(bytes(damaged))
            with pytest.raises(MettaFormatError):
                full_load(path)


def test_swapped_tensor_bodies_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "swap.mfmt"
    mettaformat.save_file({"x": torch.ones(8), "y": torch.zeros(8)}, path)
    data = bytearray(path.read_bytes())
    with mettaformat.open(path) as ckpt:
        s = ckpt.header.sections[0]
        start = s.offset + s.stream_header_length
        x, y = (s.by_name()[n] for n in ("x", "y"))
    bx, by = bytes(data[start + x.begin:start + x.end]), bytes(data[start + y.begin:start + y.end])
    data[start + x.begin:start + x.end], data[start + y.begin:start + y.end] = by, bx
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"'x'|'y'"):
        mettaformat.load_file(path)


def _mapping_of(address: int) -> str | None:
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5] if len(fields) > 5 else ""
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_raw_tensors_are_zero_copy_views_of_the_mapping(tmp_path: Path) -> None:
    path = tmp_path / "zc.mfmt"
    mettaformat.save_file({"w": torch.randn(1000, 100)}, path)
    with mettaformat.open(path) as ckpt:
        w = ckpt.get_tensor("w")
    assert _mapping_of(w.data_ptr()) == str(path.resolve())
    loaded = mettaformat.load_file(path)
    assert _mapping_of(loaded["w"].data_ptr()) == str(path.resolve())


def test_tensors_outlive_close_and_replacement_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "live.mfmt"
    original = torch.randn(256, 64)
    mettaformat.save_file({"w": original}, path)
    with mettaformat.open(path) as ckpt:
        w = ckpt.get_tensor("w")
    mettaformat.save_file({"w": torch.zeros(256, 64)}, path)  # atomic replace: the old inode stays mapped
    assert torch.equal(w, original)
    w.add_(1)  # private mapping: writes never reach the file
    assert torch.equal(mettaformat.load_file(path)["w"], torch.zeros(256, 64))


def test_open_reads_only_preamble_header_and_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "lazy.mfmt"
    mettaformat.save_file({f"t{i}": torch.randn(4096) for i in range(50)}, path, metadata={"m": 1})
    reads: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        reads.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    with mettaformat.open(path) as ckpt:
        assert len(ckpt.keys()) == 50
        header_length = ckpt.preamble.header_length
    assert sum(reads) == PREAMBLE_SIZE + header_length + TRAILER_TAIL_SIZE
    assert sum(reads) < path.stat().st_size / 50


@pytest.mark.parametrize("compression", CODECS)
def test_damaged_tensor_region_still_opens_and_lists_keys(tmp_path: Path, compression: str) -> None:
    path = tmp_path / "lazy.mfmt"
    mettaformat.save_file({"good": torch.ones(10), "bad": torch.randn(5000)}, path,
                          compression=compression)  # type: ignore[arg-type]
    with mettaformat.open(path) as ckpt:
        s = ckpt.header.sections[0]
    data = bytearray(path.read_bytes())
    data[s.end - 200:s.end - 100] = b"\xff" * 100  # inside the last tensor's bytes or frames
    path.write_bytes(bytes(data))
    with mettaformat.open(path) as ckpt:
        assert ckpt.keys() == ["good", "bad"]
        assert ckpt.metadata == {}
        assert torch.equal(ckpt.get_tensor("good"), torch.ones(10))
        with pytest.raises(MettaFormatError):
            ckpt.get_tensor("bad")


def test_file_truncated_while_open_raises_instead_of_crashing(tmp_path: Path) -> None:
    path = tmp_path / "shrink.mfmt"
    mettaformat.save_file({"a": torch.randn(100000), "b": torch.randn(100000)}, path)
    with mettaformat.open(path) as ckpt:
        ckpt.get_tensor("a")
        with open(path, "r+b") as f:
            f.truncate(5000)
        with pytest.raises(LayoutError, match="changed size"):
            ckpt.get_tensor("b")


@pytest.mark.parametrize("compression", CODECS)
def test_extracted_section_is_a_safetensors_file_equal_to_the_input(tmp_path: Path, compression: str,
                                                                    tiny_state_dict: dict[str, torch.Tensor]) -> None:
    path, out = tmp_path / "w.mfmt", tmp_path / "w.safetensors"
    mettaformat.save_file(tiny_state_dict, path, compression=compression)  # type: ignore[arg-type]
    report = extract_safetensors(path, out)
    assert report.tensors == len(tiny_state_dict) and report.aliases == {}
    loaded = safetensors.torch.load_file(out)
    assert loaded.keys() == tiny_state_dict.keys()
    for name, t in tiny_state_dict.items():
        assert torch.equal(loaded[name], t)
    if compression == "raw":  # the raw section is byte-for-byte the safetensors stream
        with mettaformat.open(path) as ckpt:
            s = ckpt.header.sections[0]
        assert path.read_bytes()[s.offset:s.end] == out.read_bytes()


def test_extraction_reports_tied_tensors(tmp_path: Path, shared_tensor_state_dict: dict[str, torch.Tensor]) -> None:
    path, out = tmp_path / "t.mfmt", tmp_path / "t.safetensors"
    mettaformat.save_file(shared_tensor_state_dict, path)
    report = extract_safetensors(path, out)
    assert report.aliases == {"head.weight": "embed.weight"}
    with safetensors.safe_open(out, "pt") as f:
        assert "head.weight" in (f.metadata() or {})["mettaformat.aliases"]


@pytest.mark.parametrize("compression", CODECS)
def test_copying_load_does_not_depend_on_the_file(tmp_path: Path, compression: str) -> None:
    path = tmp_path / "copy.mfmt"
    original = {"w": torch.randn(300, 40), "b": torch.arange(7)}
    mettaformat.save_file(original, path, compression=compression)  # type: ignore[arg-type]
    loaded = mettaformat.load_file(path, mmap=False)
    if Path("/proc/self/maps").exists():
        assert _mapping_of(loaded["w"].data_ptr()) != str(path.resolve())
    with open(path, "r+b") as f:  # truncating a mapped file would make reading the tensor fatal
        f.truncate(100)
    assert all(torch.equal(loaded[k], v) for k, v in original.items())


def test_eager_checkpoint_loads_copy_every_section(tmp_path: Path) -> None:
    from mettaformat.checkpoint_io import read_checkpoint
    from mettaformat.container.writer import write_container

    path = tmp_path / "t.mfmt"
    state = {"state": {0: {"exp_avg": torch.randn(64)}}, "param_groups": [{"lr": 0.1}]}
    write_container(path, {"model": {"w": torch.randn(32, 32)}}, trees={"optimizer": state})
    ckpt = read_checkpoint(path, lazy=False)
    assert ckpt.training is not None and ckpt.training.optimizer is not None
    exp_avg = ckpt.training.optimizer["state"][0]["exp_avg"]
    if Path("/proc/self/maps").exists():
        for t in (ckpt.tensors["w"], exp_avg):
            assert _mapping_of(t.data_ptr()) != str(path.resolve())
    with open(path, "r+b") as f:
        f.truncate(100)
    assert torch.equal(exp_avg, state["state"][0]["exp_avg"])
