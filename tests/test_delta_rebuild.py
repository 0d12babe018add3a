"""The delta rebuild from byte planes, held to the filter's rule."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

import mettaformat
from fuzz.targets import reference_planes
from mettaformat.container import delta_planes
from mettaformat.container.delta_filter import residual


def _pieces(plane: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    cuts = sorted({0, len(plane), *rng.integers(0, len(plane) + 1, 3).tolist()})
    return [plane[a:b] for a, b in itertools.pairwise(cuts)]


@pytest.mark.parametrize("width", [2, 4, 8])
@pytest.mark.parametrize("float_bits", [False, True])
def test_rebuild_gives_back_the_target(width: int, float_bits: bool) -> None:
    rng = np.random.default_rng(width * 2 + float_bits)
    n = 70_001
    for high in range(1, width + 1):
        # a base and a target close to it (the case deltas are for) and one unrelated to it (wrapping differences)
        base = rng.integers(0, 256, n * width, dtype=np.uint8)
        near = (base.view(f"<u{width}") + rng.integers(-300, 300, n).astype(f"<i{width}").view(f"<u{width}"))
        for target in (near.view(np.uint8), rng.integers(0, 256, n * width, dtype=np.uint8)):
            stored = residual(target, base, width, high).numpy()
            top = max(high, 2) if float_bits else high
            planes = [_pieces(p, rng) for p in reference_planes(stored, width, False)]
            base_planes = [_pieces(p, rng) for p in reference_planes(base, width, float_bits)[width - top :]]
            out = torch.zeros(n * width, dtype=torch.uint8)
            delta_planes.rebuild_planes(planes, base_planes, out, high, float_bits)
            assert np.array_equal(out.numpy(), target), high


def test_delta_files_of_every_float_width_load_bit_exact(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    before = {"w": torch.randn(256, 300, generator=g) * 0.02, "h": (torch.randn(70_000, generator=g)).half(),
              "d": torch.randn(9_000, generator=g).double(), "b": torch.randn(5_000, generator=g).bfloat16()}
    after = {k: v + (1e-3 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in before.items()}
    base, delta = tmp_path / "base.mfmt", tmp_path / "delta.mfmt"
    mettaformat.save_file(before, base, compression="zstd")
    mettaformat.save_file(after, delta, base=base)
    loaded = mettaformat.load_file(delta)
    for k, v in after.items():
        assert torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8)), k
