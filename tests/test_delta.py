"""Delta checkpoints: tensors stored as differences from a base file, read back bit for bit."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import mettaformat
from mettaformat.container import chain
from mettaformat.container.delta_filter import apply_residual, residual
from mettaformat.container.reader import LazyCheckpoint
from mettaformat.errors import BaseCheckpointError, IntegrityError, UnsupportedVersionError, WriteError
from tests.conftest import fixtures_dir


def _step(tensors: dict[str, torch.Tensor], seed: int, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    """One small optimizer step on the floating tensors (the others unchanged)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in tensors.items():
        if t.is_floating_point():
            out[name] = (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype)
        else:
            out[name] = t.clone()
    return out


@pytest.fixture
def model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(128, 96, generator=g), "h": torch.randn(64, 64, generator=g).bfloat16(),
            "count": torch.arange(300), "mask": torch.ones(50, dtype=torch.bool)}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int8, torch.float16])
def test_filter_inverts_every_bit_pattern(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    width = torch.empty(0, dtype=dtype).element_size()
    a = torch.randint(0, 256, (4096 * width,), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (4096 * width,), dtype=torch.uint8, generator=g)
    for base in (a, b, torch.zeros_like(a), torch.full_like(a, 255)):
        assert torch.equal(apply_residual(residual(a, base, width), base, width), a)


def test_rebuild_in_place_spans_blocks_and_hashes_what_it_wrote() -> None:
    from mettaformat.container.delta_filter import apply_residual_in_place
    from mettaformat.container.layout import checksum

    g = torch.Generator().manual_seed(2)
    base = torch.randn(100_003, generator=g)  # 400 KB: several rebuild blocks and a partial last one
    target = base + 1e-4 * torch.randn(100_003, generator=g)
    stored = residual(target, base, 4)
    digest = apply_residual_in_place(stored, base, 4, digest=True)
    assert torch.equal(stored.view(torch.float32), target)
    assert digest == checksum(target.numpy().tobytes())


def test_delta_roundtrip_and_per_tensor_choice(tmp_path: Path, model: dict[str, torch.Tensor],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    mettaformat.save_file(model, tmp_path / "base.mfmt", compression="zstd")
    nxt = _step(model, 1)
    nxt["w_resized"] = torch.randn(4, 4)  # new
    nxt["tied"] = nxt["w"]
    nxt["count"] = torch.arange(300).reshape(3, 100)  # reshaped
    g = torch.Generator().manual_seed(9)
    nxt["h"] = torch.randn(64, 64, generator=g).bfloat16()  # unrelated to the base: smaller standalone
    mettaformat.save_file(nxt, tmp_path / "d.mfmt", base=tmp_path / "base.mfmt")
    reads: list[tuple[str, int]] = []
    real_pread = LazyCheckpoint._pread

    def counting(self: LazyCheckpoint, length: int, offset: int, region: str) -> bytes:
        reads.append((Path(self.path).name, length))
        return real_pread(self, length, offset, region)

    with monkeypatch.context() as m:
        m.setattr(LazyCheckpoint, "_pread", counting)
        m.setattr(LazyCheckpoint, "_mapped", lambda self: pytest.fail("opening mapped tensor data"))
        ckpt = mettaformat.open(tmp_path / "d.mfmt")
    # opening read the preamble, header and trailer tail of both files, nothing else
    assert sorted({name for name, _ in reads}) == ["base.mfmt", "d.mfmt"]
    assert sum(n for _, n in reads) < 2 * 4096
    with ckpt:
        assert ckpt.header.delta is not None
        assert set(ckpt.header.delta.tensors["model"]) == {"w"}
        assert ckpt.header.delta.base.uri == "base.mfmt"
        assert _same(ckpt.get_tensor("tied"), nxt["w"])
    loaded = mettaformat.load_file(tmp_path / "d.mfmt")
    assert list(loaded) == list(nxt)
    for name, t in nxt.items():
        assert _same(loaded[name], t), name
    assert loaded["tied"].data_ptr() == loaded["w"].data_ptr()
    checkpoint = mettaformat.load_any(tmp_path / "d.mfmt")
    assert _same(checkpoint.tensors["w"], nxt["w"])


def test_delta_is_smaller_and_chains_resolve(tmp_path: Path, model: dict[str, torch.Tensor]) -> None:
    states = [model]
    for i in range(3):
        states.append(_step(states[-1], i + 2, 1e-4))
    mettaformat.save_file(states[0], tmp_path / "c0.mfmt", compression="zstd")
    for i in range(1, 4):  # a chain: each delta on the previous one
        with mettaformat.open(tmp_path / f"c{i - 1}.mfmt") as previous:
            mettaformat.save_file(states[i], tmp_path / f"c{i}.mfmt", base=previous)
    mettaformat.save_file(states[3], tmp_path / "alone.mfmt", compression="zstd")
    assert os.path.getsize(tmp_path / "c3.mfmt") < 0.8 * os.path.getsize(tmp_path / "alone.mfmt")
    with mettaformat.open(tmp_path / "c3.mfmt") as ckpt:
        assert [p.path.name for p in chain.chain(ckpt)] == ["c3.mfmt", "c2.mfmt", "c1.mfmt", "c0.mfmt"]
        assert all(_same(ckpt.get_tensor(n), states[3][n]) for n in model)
    # the whole folder moves: relative URIs still resolve
    shutil.move(tmp_path, tmp_path.parent / "moved")
    moved = tmp_path.parent / "moved"
    assert _same(mettaformat.load_file(moved / "c3.mfmt")["w"], states[3]["w"])


def test_chain_depth_is_bounded(tmp_path: Path, model: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
                                ) -> None:
    mettaformat.save_file(model, tmp_path / "c0.mfmt", compression="zstd")
    mettaformat.save_file(_step(model, 1), tmp_path / "c1.mfmt", base=tmp_path / "c0.mfmt")
    mettaformat.save_file(_step(model, 2), tmp_path / "c2.mfmt", base=tmp_path / "c1.mfmt")
    monkeypatch.setattr(chain, "MAX_CHAIN_DEPTH", 1)
    with pytest.raises(BaseCheckpointError, match="deeper than 1") as e:
        mettaformat.open(tmp_path / "c2.mfmt")
    assert e.value.region == "base chain" and "c2.mfmt" in str(e.value)
    import mettaformat.container.delta_write as delta_write

    monkeypatch.setattr(delta_write, "MAX_CHAIN_DEPTH", 1)
    with pytest.raises(WriteError, match="bases deep"):
        mettaformat.save_file(model, tmp_path / "c3.mfmt", base=tmp_path / "c1.mfmt")


def test_cycle_is_refused(tmp_path: Path, model: dict[str, torch.Tensor]) -> None:
    mettaformat.save_file(model, tmp_path / "base.mfmt", compression="zstd")
    mettaformat.save_file(_step(model, 1), tmp_path / "d.mfmt", base=tmp_path / "base.mfmt")
    os.replace(tmp_path / "d.mfmt", tmp_path / "base.mfmt")  # a file that names itself as its base
    with pytest.raises(BaseCheckpointError, match="cycle") as e:
        mettaformat.load_file(tmp_path / "base.mfmt")
    assert e.value.region == "base chain"


def test_missing_changed_and_damaged_bases(tmp_path: Path, model: dict[str, torch.Tensor]) -> None:
    base, delta = tmp_path / "base.mfmt", tmp_path / "d.mfmt"
    mettaformat.save_file(model, base, compression="zstd")
    mettaformat.save_file(_step(model, 1), delta, base=base)
    original = base.read_bytes()

    base.unlink()
    with pytest.raises(BaseCheckpointError, match="not found") as e:
        mettaformat.load_file(delta)
    assert str(delta) in str(e.value) and "base.mfmt" in str(e.value) and e.value.region == "base"

    mettaformat.save_file(_step(model, 5), base, compression="zstd")  # another checkpoint under that name
    with pytest.raises(BaseCheckpointError, match="not the file") as e:
        mettaformat.open(delta)
    assert str(delta) in str(e.value) and str(base) in str(e.value) and e.value.region == "base identity"

    damaged = bytearray(original)
    damaged[40] ^= 1  # inside the base's header
    base.write_bytes(bytes(damaged))
    with pytest.raises(BaseCheckpointError, match="cannot be read") as e:
        mettaformat.open(delta)
    assert str(delta) in str(e.value) and str(base) in str(e.value)

    damaged = bytearray(original)
    damaged[-200] ^= 0xFF  # inside the base's last section: found when a tensor is rebuilt
    base.write_bytes(bytes(damaged))
    with pytest.raises((BaseCheckpointError, IntegrityError)) as e2:
        mettaformat.load_file(delta)
    assert str(delta) in str(e2.value)


def test_base_beside_the_delta_is_found(tmp_path: Path, model: dict[str, torch.Tensor]) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mettaformat.save_file(model, tmp_path / "a" / "base.mfmt", compression="zstd")
    nxt = _step(model, 1)
    mettaformat.save_file(nxt, tmp_path / "b" / "d.mfmt", base=tmp_path / "a" / "base.mfmt")
    shutil.move(tmp_path / "a" / "base.mfmt", tmp_path / "b" / "base.mfmt")
    assert _same(mettaformat.load_file(tmp_path / "b" / "d.mfmt")["w"], nxt["w"])


def test_old_readers_refuse_a_delta(tmp_path: Path, model: dict[str, torch.Tensor],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from mettaformat.container import header

    mettaformat.save_file(model, tmp_path / "base.mfmt", compression="zstd")
    mettaformat.save_file(_step(model, 1), tmp_path / "d.mfmt", base=tmp_path / "base.mfmt")
    monkeypatch.setattr(header, "KNOWN_EXTENSIONS", frozenset({header.COLUMNAR_INDEX}))
    with pytest.raises(UnsupportedVersionError, match=r"mettaformat\.delta"):
        mettaformat.open(tmp_path / "d.mfmt")


def test_consecutive_metta_checkpoints(tmp_path: Path) -> None:
    folder = fixtures_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = mettaformat.load_any(folder / "v1_era_d_model_0000.pt").tensors
        second = mettaformat.load_any(folder / "v1_era_d_model_0050.pt").tensors
    mettaformat.save_file(first, tmp_path / "0000.mfmt", compression="zstd")
    mettaformat.save_file(second, tmp_path / "0050.mfmt", compression="zstd")
    mettaformat.save_file(second, tmp_path / "0050.delta.mfmt", base=tmp_path / "0000.mfmt")
    assert os.path.getsize(tmp_path / "0050.delta.mfmt") < os.path.getsize(tmp_path / "0050.mfmt")
    loaded = mettaformat.load_file(tmp_path / "0050.delta.mfmt")
    assert all(_same(loaded[n], t.contiguous()) for n, t in second.items())
