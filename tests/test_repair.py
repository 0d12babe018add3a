"""validate names damage; repair recovers header-damaged, truncated and bit-flipped files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mettaformat
from mettaformat.cli.main import main
from mettaformat.container.writer import write_container
from mettaformat.errors import WriteError
from mettaformat.repair import repair
from mettaformat.validate import validate

CODECS = ["raw", "zstd"]


def make(tmp_path: Path, compression: str) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    tensors = {f"layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(4)}
    path = tmp_path / "m.mfmt"
    opt = {"state": {0: {"exp_avg": torch.randn(8, generator=g)}}, "param_groups": [{"lr": 0.1}]}
    write_container(path, {"model": tensors}, metadata={"epoch": 9}, trees={"optimizer": opt},
                    compression=compression)  # type: ignore[arg-type]
    return path, tensors


def tensor_region(path: Path, name: str) -> tuple[int, int]:
    with mettaformat.open(path) as f:
        s = f.header.section("model")
        assert s is not None
        if s.codec == "raw":
            t = s.by_name()[name]
            start = s.offset + s.stream_header_length
            return start + t.begin, start + t.end
        first, end = f.section_reader("model").tensor_frames[name]  # type: ignore[attr-defined]
        frames = f.section_reader("model").frames  # type: ignore[attr-defined]
        return frames[first][0], frames[end - 1][0] + frames[end - 1][1]


@pytest.mark.parametrize("compression", CODECS)
def test_validate_ok_and_names_a_damaged_tensor(tmp_path: Path, compression: str) -> None:
    path, _ = make(tmp_path, compression)
    assert validate(path, deep=True).ok
    start, end = tensor_region(path, "layer2.weight")
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 1
    path.write_bytes(bytes(data))
    report = validate(path, deep=True)
    assert not report.ok
    assert any("layer2.weight" in p.region or "frame" in p.region for p in report.problems)
    assert main(["validate", str(path)]) == 1


@pytest.mark.parametrize("compression", CODECS)
def test_repair_bit_flipped_file_drops_or_zero_fills(tmp_path: Path, compression: str) -> None:
    path, tensors = make(tmp_path, compression)
    start, end = tensor_region(path, "layer1.weight")
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    report = repair(path, tmp_path / "fixed.mfmt")
    assert report.lost == ["model:layer1.weight"] and report.index_from == "header"
    fixed = mettaformat.load_file(tmp_path / "fixed.mfmt")
    assert set(fixed) == {"layer0.weight", "layer2.weight", "layer3.weight"}
    assert all(torch.equal(fixed[k], tensors[k]) for k in fixed)
    with mettaformat.open(tmp_path / "fixed.mfmt") as f:
        assert f.metadata == {"epoch": 9} and "optimizer" in f.tree_names
    report = repair(path, tmp_path / "zeroed.mfmt", zero=True)
    assert report.zero_filled == ["model:layer1.weight"]
    assert torch.count_nonzero(mettaformat.load_file(tmp_path / "zeroed.mfmt")["layer1.weight"]) == 0


@pytest.mark.parametrize("compression", CODECS)
def test_repair_header_damaged_file_uses_the_trailer_index(tmp_path: Path, compression: str) -> None:
    path, tensors = make(tmp_path, compression)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # inside the msgpack header
    path.write_bytes(bytes(data))
    assert not validate(path).ok
    report = repair(path, tmp_path / "fixed.mfmt")
    assert report.index_from == "trailer" and not report.lost
    assert any("metadata" in n for n in report.notes)
    fixed = mettaformat.load_file(tmp_path / "fixed.mfmt")
    assert all(torch.equal(fixed[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("compression", CODECS)
def test_repair_truncated_file_keeps_complete_leading_tensors(tmp_path: Path, compression: str) -> None:
    path, tensors = make(tmp_path, compression)
    start, end = tensor_region(path, "layer3.weight")
    cut = (start + end) // 2  # the last tensor is cut in half; the trailer is gone
    path.write_bytes(path.read_bytes()[:cut])
    report = repair(path, tmp_path / "fixed.mfmt")
    assert "model:layer3.weight" in report.lost
    fixed = mettaformat.load_file(tmp_path / "fixed.mfmt")
    assert {"layer0.weight", "layer1.weight", "layer2.weight"} <= set(fixed)
    assert all(torch.equal(fixed[k], tensors[k]) for k in fixed)
    assert main(["repair", str(path), str(tmp_path / "again.mfmt"), "--json"]) == 1


def test_repair_never_overwrites_its_input(tmp_path: Path) -> None:
    path, _ = make(tmp_path, "raw")
    with pytest.raises(WriteError):
        repair(path, path)
