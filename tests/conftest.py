from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "metta"


@pytest.fixture
def tiny_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "encoder.weight": torch.randn(16, 8, generator=g),
        "encoder.bias": torch.randn(16, generator=g),
        "steps": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(4, 4, generator=g).to(torch.bfloat16),
    }


@pytest.fixture
def shared_tensor_state_dict() -> dict[str, torch.Tensor]:
    emb = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    return {"embed.weight": emb, "head.weight": emb, "bias": torch.zeros(4)}


def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"Metta fixtures not found at {FIXTURES} (they live in ../shared beside the repo)")
    return FIXTURES
