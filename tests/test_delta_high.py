"""The ``zigzag-sub-high`` filter (3.4): only the high bytes differenced, rebuilt from the base's high planes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mettaformat
from mettaformat.codecs import ZstdCodec
from mettaformat.container import chain, delta_planes
from mettaformat.container.delta import FILTER, FILTER_WHOLE
from mettaformat.container.delta_filter import apply_residual, residual
from mettaformat.errors import BaseCheckpointError, HeaderError, IntegrityError
from tests.test_delta import _same, _step
from tests.test_vectors import _load_generator

GEN = _load_generator()


def _zigzag_whole(target: np.ndarray, base: np.ndarray) -> np.ndarray:
    """The 3.3 ``zigzag-sub`` formula of spec/codecs/delta.md, written out for uint32."""
    d = (target.astype(np.int64) - base.astype(np.int64)) % (1 << 32)
    signed = np.where(d >= 1 << 31, d - (1 << 32), d)
    return np.where(signed >= 0, 2 * signed, -2 * signed - 1).astype(np.uint32)


def test_all_high_bytes_is_the_whole_element_filter_of_3_3() -> None:
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 256, (4 * 5000,), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (4 * 5000,), dtype=torch.uint8, generator=g)
    want = _zigzag_whole(t.numpy().view(np.uint32), b.numpy().view(np.uint32))
    assert np.array_equal(residual(t, b, 4).numpy().view(np.uint32), want)
    assert np.array_equal(residual(t, b, 4, 4).numpy().view(np.uint32), want)


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_every_high_count_inverts_and_keeps_the_low_bytes(width: int) -> None:
    g = torch.Generator().manual_seed(width)
    t = torch.randint(0, 256, (width * 3001,), dtype=torch.uint8, generator=g)
    for b in (torch.randint(0, 256, t.shape, dtype=torch.uint8, generator=g), torch.zeros_like(t),
              torch.full_like(t, 255)):
        for high in range(1, width + 1):
            stored = residual(t, b, width, high)
            low = width - high  # the stored low bytes are the target's own
            assert torch.equal(stored.reshape(-1, width)[:, :low], t.reshape(-1, width)[:, :low])
            assert torch.equal(apply_residual(stored, b, width, high), t)


def _training_pair(n: int = 300_000) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(n, generator=g) * 0.05, "h": (torch.randn(n // 4, generator=g) * 0.05).bfloat16(),
            "small": torch.randn(100, generator=g), "ids": torch.arange(5000, dtype=torch.int64)}
    nxt = _step(base, 6, 1e-5)
    nxt["ids"] = base["ids"] + 1
    return base, nxt


def _plans(path: Path) -> set[str]:
    """The residuals of ``path`` rebuilt from the base's high planes."""
    with mettaformat.open(path) as c:
        s = c.header.section("model")
        names = chain.delta_names(c, "model")
        return {e.name for e in s.tensors if e.name in names and delta_planes.plane_plan(c, s, e, names[e.name])}


def test_writer_measures_high_bytes_and_the_plane_path_matches_the_general_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, nxt = _training_pair()
    mettaformat.save_file(base, tmp_path / "b.mfmt", compression="zstd")
    mettaformat.save_file(nxt, tmp_path / "d.mfmt", base=tmp_path / "b.mfmt")
    with mettaformat.open(tmp_path / "d.mfmt") as c:
        assert c.header.delta is not None and c.header.delta.filter == FILTER
        highs = {name: t.high for name, t in c.header.delta.tensors["model"].items()}
    assert 1 <= highs["w"] < 4  # a small step leaves the low mantissa bytes random: no base needed there
    assert _plans(tmp_path / "d.mfmt") >= {"w", "h"}  # rebuilt from the base's high planes
    fast = mettaformat.load_file(tmp_path / "d.mfmt")
    with mettaformat.open(tmp_path / "d.mfmt") as c:
        one = c.get_tensor("w")
        assert c.get_slice("w").get_dtype() == "F32" and _same(c.get_slice("w")[:10], nxt["w"][:10])
    monkeypatch.setattr(chain, "plane_plan", lambda *a: None)  # the general path: whole base tensors
    general = mettaformat.load_file(tmp_path / "d.mfmt")
    for name, t in nxt.items():
        assert _same(fast[name], t) and _same(general[name], t), name
    assert _same(one, nxt["w"])


def test_raw_bases_chains_and_other_frame_sizes_take_the_general_path(tmp_path: Path) -> None:
    base, nxt = _training_pair(100_000)
    third = _step(nxt, 7, 1e-5)
    mettaformat.save_file(base, tmp_path / "raw.mfmt")  # uncompressed: the base tensors are mapped, not decoded
    mettaformat.save_file(nxt, tmp_path / "on_raw.mfmt", base=tmp_path / "raw.mfmt")
    mettaformat.save_file(third, tmp_path / "chain.mfmt", base=tmp_path / "on_raw.mfmt")
    mettaformat.save_file(base, tmp_path / "zstd.mfmt", compression="zstd")  # residual chunks cut elsewhere:
    mettaformat.save_file(nxt, tmp_path / "on_cut.mfmt", base=tmp_path / "zstd.mfmt",
                          compression=ZstdCodec(frame_size=1 << 16))
    for path, want in (("on_raw", nxt), ("chain", third), ("on_cut", nxt)):
        assert "w" not in _plans(tmp_path / f"{path}.mfmt")
        got = mettaformat.load_file(tmp_path / f"{path}.mfmt")
        assert all(_same(got[k], v) for k, v in want.items()), path


def _edit_delta(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the header of ``path`` after ``edit(header)`` (checksums recomputed: a well-formed file)."""
    header, index, sections = GEN.split(path.read_bytes(), columnar=True)
    edit(header)
    path.write_bytes(GEN.assemble(header, sections, index=index, minor=4))


@pytest.mark.parametrize("value", [0, 5, "2", None])
def test_high_outside_the_element_is_refused(tmp_path: Path, value: object) -> None:
    base, nxt = _training_pair(20_000)
    mettaformat.save_file(base, tmp_path / "b.mfmt", compression="zstd")
    mettaformat.save_file(nxt, tmp_path / "d.mfmt", base=tmp_path / "b.mfmt")
    _edit_delta(tmp_path / "d.mfmt", lambda h: h["delta"]["tensors"]["model"]["w"].__setitem__(2, value))
    with pytest.raises(HeaderError, match=r"d\.mfmt.*high") as e:
        mettaformat.load_file(tmp_path / "d.mfmt")
    assert "delta.tensors.model.w" in str(e.value)


def test_entries_must_match_the_filter(tmp_path: Path) -> None:
    base, nxt = _training_pair(20_000)
    mettaformat.save_file(base, tmp_path / "b.mfmt", compression="zstd")
    mettaformat.save_file(nxt, tmp_path / "d.mfmt", base=tmp_path / "b.mfmt")
    _edit_delta(tmp_path / "d.mfmt", lambda h: h["delta"].__setitem__("filter", FILTER_WHOLE))  # 3 fields, 3.3 name
    with pytest.raises(HeaderError, match=r"expected \[dtype, checksum\]"):
        mettaformat.load_file(tmp_path / "d.mfmt")


def test_base_of_another_width_is_refused_naming_both_files(tmp_path: Path) -> None:
    base, nxt = _training_pair(20_000)
    other = dict(base, w=base["w"].double())  # the same name with 8-byte elements: another plane count
    mettaformat.save_file(base, tmp_path / "b.mfmt", compression="zstd")
    mettaformat.save_file(nxt, tmp_path / "d.mfmt", base=tmp_path / "b.mfmt")
    mettaformat.save_file(other, tmp_path / "other.mfmt", compression="zstd")
    size = (tmp_path / "other.mfmt").stat().st_size  # the identity is checked first: make it match
    with mettaformat.open(tmp_path / "other.mfmt") as c:
        digest = c.preamble.header_checksum
    _edit_delta(tmp_path / "d.mfmt", lambda h: h["delta"]["base"].update(
        uri="other.mfmt", file_length=size, header_checksum=digest.to_bytes(8, "little")))
    with pytest.raises(BaseCheckpointError, match=r"d\.mfmt.*other\.mfmt.*F64.*F32"):
        mettaformat.load_file(tmp_path / "d.mfmt")


def test_a_raw_base_is_read_where_it_is_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mettaformat.container import section_load

    base, nxt = _training_pair(50_000)
    mettaformat.save_file(base, tmp_path / "raw.mfmt")
    mettaformat.save_file(nxt, tmp_path / "d.mfmt", base=tmp_path / "raw.mfmt")
    copied: list[str] = []
    real = section_load.read_copy
    monkeypatch.setattr(section_load, "read_copy", lambda ckpt, *a: copied.append(str(ckpt.path)) or real(ckpt, *a))
    got = mettaformat.load_file(tmp_path / "d.mfmt")
    assert all(_same(got[k], v) for k, v in nxt.items())
    assert str(tmp_path / "raw.mfmt") not in copied  # no copy, no decode of the base
    damaged = bytearray((tmp_path / "raw.mfmt").read_bytes())
    with mettaformat.open(tmp_path / "raw.mfmt") as c:
        s = c.header.section("model")
        e = s.index.get("w")
        top = s.offset + s.stream_header_length + e.begin + 3  # the top byte of w's first element
    damaged[top] ^= 0x40
    (tmp_path / "raw.mfmt").write_bytes(bytes(damaged))
    with pytest.raises(IntegrityError, match=r"d\.mfmt.*'w' rebuilt from base .*raw\.mfmt"):
        mettaformat.load_file(tmp_path / "d.mfmt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32,
                                   torch.int16, torch.int64])
def test_every_high_count_rebuilds_from_the_planes_as_from_whole_tensors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    from mettaformat.container import delta_write

    g = torch.Generator().manual_seed(11)
    raw = torch.randint(0, 256, (20_000 * torch.empty(0, dtype=dtype).element_size(),), dtype=torch.uint8,
                        generator=g)
    base = {"t": raw.view(dtype)}
    nxt = {"t": torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g).view(dtype)}  # every byte moves
    mettaformat.save_file(base, tmp_path / "b.mfmt", compression="zstd")
    width = raw.numel() // 20_000
    for high in range(1, width + 1):
        monkeypatch.setattr(delta_write, "choose_high", lambda *a, high=high: high)  # as if measured
        mettaformat.save_file(nxt, tmp_path / "d.mfmt", base=tmp_path / "b.mfmt")
        assert _plans(tmp_path / "d.mfmt") == {"t"}
        with monkeypatch.context() as m:
            m.setattr(chain, "plane_plan", lambda *a: None)
            general = mettaformat.load_file(tmp_path / "d.mfmt")["t"]
        assert _same(mettaformat.load_file(tmp_path / "d.mfmt")["t"], nxt["t"]), high
        assert _same(general, nxt["t"]), high


def test_a_rebuilt_tensor_relies_on_its_checksum_for_stored_planes(tmp_path: Path) -> None:
    """As in a standalone load: a stored plane's bytes are covered by the rebuilt tensor's checksum."""
    from tests.test_codecs import _flip_in_stored_frame

    g = torch.Generator().manual_seed(5)
    before = torch.randn(100_000, generator=g)
    after = before + 1e-4 * torch.randn(100_000, generator=g)
    base = tmp_path / "base.mfmt"
    mettaformat.save_file({"t": before}, base, compression="zstd")
    for where in (5, -1):
        path = tmp_path / f"delta{where}.mfmt"
        mettaformat.save_file({"t": after}, path, base=base)
        with mettaformat.open(path) as c:  # the residual is rebuilt from planes, the path under test
            s = c.header.section("model")
            assert s is not None and (entry := s.index.get("t")) is not None
            assert delta_planes.plane_plan(c, s, entry, chain.delta_names(c, "model")["t"]) is not None
        _flip_in_stored_frame(path, where)
        if where < 0:  # the frame's own checksum is not consulted; the bytes are intact
            assert torch.equal(mettaformat.load_file(path)["t"], after)
            continue
        with pytest.raises(IntegrityError, match="does not match its checksum"):
            mettaformat.load_file(path)
        assert (mettaformat.load_file(path, verify=False)["t"] != after).sum() == 1
