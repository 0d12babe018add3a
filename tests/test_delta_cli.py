"""The command line on delta checkpoints: materialize, inspect, validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mettaformat
from mettaformat.cli.main import main
from mettaformat.container.writer import write_container


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    first = {"w": torch.randn(64, 64, generator=g), "tied": torch.zeros(1)}
    first["tied"] = first["w"]
    second = {"w": first["w"] + 1e-4 * torch.randn(64, 64, generator=g)}
    second["tied"] = second["w"]
    mettaformat.save_file(first, tmp_path / "base.mfmt", compression="zstd")
    write_container(tmp_path / "d.mfmt", {"model": second}, metadata={"epoch": 2},
                    trees={"optimizer": {"step": 3, "m": torch.ones(3)}}, base=tmp_path / "base.mfmt")
    return tmp_path / "base.mfmt", tmp_path / "d.mfmt", second


def test_materialize_writes_a_standalone_copy(pair: tuple[Path, Path, dict[str, torch.Tensor]],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    base, delta, second = pair
    out = delta.parent / "full.mfmt"
    assert main(["materialize", str(delta), str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chain"] == [str(base)]
    base.unlink()  # the copy stands alone
    with mettaformat.open(out) as ckpt:
        assert ckpt.header.delta is None and ckpt.metadata["epoch"] == 2
        assert torch.equal(ckpt.get_tensor("w"), second["w"]) and ckpt.keys() == ["w", "tied"]
        assert torch.equal(ckpt.tree("optimizer")["m"], torch.ones(3))


@pytest.mark.parametrize("target", ["delta", "base"])
def test_materialize_refuses_to_overwrite_what_it_reads(pair: tuple[Path, Path, dict[str, torch.Tensor]],
                                                        target: str, capsys: pytest.CaptureFixture[str]) -> None:
    base, delta, _ = pair
    before = (delta.read_bytes(), base.read_bytes())
    assert main(["materialize", str(delta), str(delta if target == "delta" else base)]) == 1
    assert "never overwrites its input" in capsys.readouterr().err
    assert (delta.read_bytes(), base.read_bytes()) == before


def test_inspect_and_validate_show_the_chain(pair: tuple[Path, Path, dict[str, torch.Tensor]],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    base, delta, _ = pair
    assert main(["inspect", str(delta), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["delta"] == {"base": "base.mfmt", "chain": [str(base)], "filter": "zigzag-sub-high", "tensors": 1}
    assert {t["name"]: (t["dtype"], t["delta"]) for t in info["tensors"] if t["section"] == "model"} == {
        "w": ("F32", True), "tied": ("F32", True)}
    assert main(["inspect", str(delta)]) == 0
    assert "delta of base.mfmt" in capsys.readouterr().out
    assert main(["validate", str(delta)]) == 0
    capsys.readouterr()
    data = bytearray(base.read_bytes())
    data[-100] ^= 0xFF  # the base's trailer index: the base is damaged, the delta is not
    base.write_bytes(bytes(data))
    assert main(["validate", str(delta)]) == 1
    assert str(base) in capsys.readouterr().out


def test_materialize_keeps_each_sections_codec(tmp_path: Path) -> None:
    from mettaformat.container.codecs import RawCodec, ZstdCodec
    from mettaformat.container.materialize import materialize
    from mettaformat.container.writer import _write

    g = torch.Generator().manual_seed(4)
    sections = {"model": {"w": torch.randn(32, 32, generator=g)}, "extra": {"e": torch.randn(100, generator=g)}}
    codecs = {"model": ZstdCodec(level=5, frame_size=1 << 16), "extra": RawCodec()}
    with open(tmp_path / "mixed.mfmt", "wb") as f:
        _write(f.fileno(), sections, {"epoch": 1}, None, codecs, encoded_trees={})
    nxt = {"w": sections["model"]["w"] + 1e-5 * torch.randn(32, 32, generator=g)}
    write_container(tmp_path / "d.mfmt", {"model": nxt, "extra": sections["extra"]}, base=tmp_path / "mixed.mfmt",
                    compression="zstd", level=7)
    materialize(tmp_path / "mixed.mfmt", tmp_path / "mixed_copy.mfmt")
    materialize(tmp_path / "d.mfmt", tmp_path / "d_copy.mfmt")
    for source, copy in (("mixed", "mixed_copy"), ("d", "d_copy")):
        with mettaformat.open(tmp_path / f"{source}.mfmt") as a, mettaformat.open(tmp_path / f"{copy}.mfmt") as b:
            assert b.header.delta is None
            assert [(s.name, s.codec, dict(s.configuration)) for s in a.header.sections] == [
                (s.name, s.codec, dict(s.configuration)) for s in b.header.sections]
            for s in a.sections:
                for name in a.keys(s):
                    assert torch.equal(a.get_tensor(name, section=s), b.get_tensor(name, section=s))
    with mettaformat.open(tmp_path / "mixed_copy.mfmt") as b:
        assert {s.name: s.codec for s in b.header.sections} == {"model": "zstd", "extra": "raw"}


def test_ls_shows_each_files_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 64, generator=g)
    mettaformat.save_file({"w": w}, tmp_path / "model_0000.mfmt", metadata={"epoch": 0}, compression="zstd")
    mettaformat.save_file({"w": w + 1e-5}, tmp_path / "model_0001.mfmt", metadata={"epoch": 1},
                          base=tmp_path / "model_0000.mfmt")
    assert main(["ls", str(tmp_path), "--json", "--no-index"]) == 0
    listed = {c["name"]: c["base"] for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert listed == {"model_0000.mfmt": None, "model_0001.mfmt": str(tmp_path / "model_0000.mfmt")}
    assert main(["ls", str(tmp_path), "--no-index"]) == 0
    rows = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:]
            if line.startswith("model_")}
    assert rows == {"model_0000.mfmt": "-", "model_0001.mfmt": "model_0000.mfmt"}
