"""CUDA placement and RNG: run where a GPU is present (skipped elsewhere, e.g. in CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import mettaformat
from mettaformat import MettaAgent

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def build(attrs: dict, metadata: dict, config: dict) -> nn.Module:  # type: ignore[type-arg]
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


mettaformat.register_model_type("gpu-mlp", build, replace=True)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_cuda_tensors_save_and_load_to_cuda(tmp_path: Path, compression: str) -> None:
    tensors = {"w": torch.randn(64, 64, device="cuda"), "h": torch.randn(8, device="cuda").half(),
               "t": torch.randn(32, 16, device="cuda").t()}
    path = tmp_path / "g.mfmt"
    mettaformat.save_file(tensors, path, compression=compression)  # type: ignore[arg-type]
    loaded = mettaformat.load_file(path, device="cuda")
    for k, v in tensors.items():
        assert loaded[k].device.type == "cuda" and torch.equal(loaded[k], v)
    with mettaformat.open(path) as f:
        f.to("cuda:0")
        assert f.get_tensor("w").device == torch.device("cuda", 0)


def test_agent_loads_onto_the_gpu(tmp_path: Path) -> None:
    agent = MettaAgent(build({}, {}, {}).cuda(), model_type="gpu-mlp")
    agent.save(tmp_path / "a.mfmt")
    loaded = MettaAgent.load(tmp_path / "a.mfmt", device="cuda")
    assert next(loaded.parameters()).device.type == "cuda"
    x = torch.randn(3, 16, device="cuda")
    assert torch.equal(loaded(x), agent(x))


def test_cuda_rng_state_is_saved_and_restored(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build({}, {}, {}).cuda()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 16, device="cuda")).sum().backward()
    opt.step()
    MettaAgent(model, model_type="gpu-mlp").save_for_training(tmp_path / "t.mfmt", optimizer=opt)
    expected = torch.randn(5, device="cuda")  # the draw right after the save
    torch.randn(100, device="cuda")            # move the generator on
    target = build({}, {}, {}).cuda()
    fresh = torch.optim.Adam(target.parameters())
    agent = MettaAgent.load_for_training(tmp_path / "t.mfmt", device="cuda", model=target, optimizer=fresh)
    assert "rng_not_restored" not in agent.provenance
    assert torch.equal(torch.randn(5, device="cuda"), expected)
    for state in fresh.state.values():
        assert all(v.device.type == "cuda" for v in state.values() if isinstance(v, torch.Tensor) and v.dim())
