"""What a user reads: every error names the file passed, validate counts and reports each tensor once."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import mettaformat
from mettaformat.container.writer import write_container
from mettaformat.errors import MettaFormatError
from mettaformat.validate import validate
from tests import craft


def _container(path: Path, compression: str = "raw") -> Path:
    mettaformat.save_file({f"l{i}": torch.randn(64) for i in range(6)}, path, compression=compression)  # type: ignore[arg-type]
    return path


def _truncated(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-100])


def _flipped(p: Path) -> None:
    data = bytearray(p.read_bytes())
    parts = craft.parse(bytes(data))
    start, _ = parts.tensor_span("l3")
    data[parts.section()["offset"] + start] ^= 0xFF
    p.write_bytes(bytes(data))


def _bad_magic(p: Path) -> None:
    p.write_bytes(b"XXXXXXXX" + p.read_bytes()[8:])


def _header_flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[40] ^= 0xFF
    p.write_bytes(bytes(data))


def _legacy_garbage(p: Path) -> None:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _legacy_bad_pickle(p: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00(X\x01")  # cut inside a string
        z.writestr("archive/version", b"3\n")
    p.write_bytes(buf.getvalue())


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated container": (_truncated, ".mfmt"),
    "flipped tensor byte": (_flipped, ".mfmt"),
    "bad magic": (_bad_magic, ".mfmt"),
    "damaged header": (_header_flip, ".mfmt"),
    "cut legacy zip": (_legacy_garbage, ".pt"),
    "broken legacy pickle": (_legacy_bad_pickle, ".pt"),
}

ENTRY_POINTS: dict[str, Callable[[Path], Any]] = {
    "load_file": mettaformat.load_file,
    "open+get_tensor": lambda p: mettaformat.open(p).get_tensor("l3"),
    "load_any": lambda p: {k: v + 0 for k, v in mettaformat.load_any(p).tensors.items()},
    "MettaAgent.load": lambda p: mettaformat.MettaAgent.load(p, model=_Six(), lazy=False),
}


class _Six(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for i in range(6):
            self.register_buffer(f"l{i}", torch.zeros(64))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_error_names_the_file_the_user_passed(tmp_path: Path, damage: str, entry: str) -> None:
    make, suffix = DAMAGE[damage]
    path = _container(tmp_path / f"m{suffix}")
    make(path)
    if suffix == ".pt" and entry in ("load_file", "open+get_tensor"):
        pytest.skip("container-only entry point")
    with pytest.raises(MettaFormatError) as info:
        ENTRY_POINTS[entry](path)
    assert str(path) in str(info.value), info.value
    assert info.value.file == str(path)
    if damage in ("truncated container", "flipped tensor byte"):
        assert f"mettaformat repair {path}" in str(info.value)
    if damage == "bad magic" or suffix == ".pt":
        assert "mettaformat repair" not in str(info.value)  # nothing to recover from


def test_the_file_is_named_once_even_through_nested_entry_points(tmp_path: Path) -> None:
    path = _container(tmp_path / "m.mfmt")
    _truncated(path)
    with pytest.raises(MettaFormatError) as info:
        mettaformat.load_any(path)
    assert str(info.value).count(str(path)) == 2  # the message's path and the repair command's
    assert str(info.value).count("mettaformat repair") == 1


@pytest.mark.parametrize("compression", ["raw", "zstd"])
@pytest.mark.parametrize("where", ["model", "tree"])
def test_validate_counts_every_tensor_and_reports_each_damage_once(
    tmp_path: Path, compression: str, where: str
) -> None:
    path = tmp_path / "v.mfmt"
    g = torch.Generator().manual_seed(5)
    tensors = {f"layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(35)}
    opt = {"state": {0: {"exp_avg": torch.randn(4096, generator=g)}}, "param_groups": [{"lr": 0.1}]}
    write_container(path, {"model": tensors}, metadata={"epoch": 9}, trees={"optimizer": opt}, compression=compression)  # type: ignore[arg-type]
    assert validate(path).tensors_checked == 36
    data = bytearray(path.read_bytes())
    parts = craft.parse(bytes(data))
    i = 0 if where == "model" else 1
    section = parts.section(i)
    name = section["tensors"][-1]["name"]
    if compression == "raw":
        start, _ = parts.tensor_span(name, i)
    else:
        start = section["stream"]["header_length"] + 60  # inside the last tensor's frame
        start = section["length"] - 30
    data[section["offset"] + start] ^= 0xFF
    path.write_bytes(bytes(data))
    report = validate(path)
    assert report.tensors_checked == 36
    assert len(report.problems) == 1, report.problems
    assert name in report.problems[0].region
