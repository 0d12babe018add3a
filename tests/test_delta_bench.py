"""The delta benchmark's measuring pieces run against the current reader (they patch its methods by name)."""

from __future__ import annotations

from pathlib import Path

import torch

import mettaformat
from benchmarks.delta_measure import entropy_bound, load_stages


def _pair(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    before = {"w": torch.randn(64, 512, generator=g), "b": torch.randn(4096, generator=g)}
    after = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in before.items()}
    base, full, delta = tmp_path / "base.mfmt", tmp_path / "full.mfmt", tmp_path / "delta.mfmt"
    mettaformat.save_file(before, base, compression="zstd")
    mettaformat.save_file(after, full, compression="zstd")
    mettaformat.save_file(after, delta, base=base)
    return delta, full, before, after


def test_load_stages_time_every_stage_of_the_plane_path(tmp_path: Path) -> None:
    delta, full, _, _ = _pair(tmp_path)
    stages = load_stages(delta, full, repeat=1)
    assert stages["plane_path_bytes"] == stages["bytes"] > 0
    want = {"delta: residual planes decode", "delta: base high planes decode", "alone: chunk decode (planes and join)"}
    assert want <= set(stages["stages_ms"])


def test_entropy_bound_is_below_the_standalone_size(tmp_path: Path) -> None:
    _, _, before, after = _pair(tmp_path)
    alone, bound = entropy_bound(before, after)
    assert 0 < bound < alone
