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


@pytest.mark.parametrize("compression", ["raw", "zstd"])
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


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn)


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out: dict[str, torch.Tensor] = {"odd": torch.arange(7, dtype=torch.int8)}
    for dtype in _DTYPES:
        x = torch.randn(70_001, generator=g) * 4
        out[str(dtype)] = (x > 0) if dtype == torch.bool else x.to(dtype)
    out["tied"] = out["torch.float32"]
    out["big"] = torch.randn(20 << 20, generator=g)  # several ring slots
    return out


@pytest.mark.parametrize("compression", ["raw", "zstd"])
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_pipelined_load_to_each_gpu(tmp_path: Path, compression: str, device: str) -> None:
    if device == "cuda:1" and torch.cuda.device_count() < 2:
        pytest.skip("needs a second CUDA device")
    state = _every_dtype()
    path = tmp_path / "m.mfmt"
    mettaformat.save_file(state, path, compression=compression)  # type: ignore[arg-type]
    loaded = mettaformat.load_file(path, device=device)
    target = torch.device(device)
    for k, v in state.items():
        got = loaded[k]
        assert got.device.type == "cuda" and (target.index is None or got.device.index == target.index), k
        assert got.dtype == v.dtype and torch.equal(got.cpu().view(torch.uint8), v.view(torch.uint8)), k
    assert loaded["tied"] is loaded["torch.float32"]
    with mettaformat.open(path) as f:
        f.to(device)
        assert torch.equal(f.get_tensor("big").cpu(), state["big"])


def test_agent_load_for_training_keeps_the_optimizer_on_the_models_parameters(tmp_path: Path) -> None:
    model = build({}, {}, {}).cuda()
    opt = torch.optim.Adam(model.parameters())
    MettaAgent(model, model_type="gpu-mlp").save_for_training(tmp_path / "t.mfmt", optimizer=opt)
    target = build({}, {}, {}).cuda()
    fresh = torch.optim.Adam(target.parameters())
    MettaAgent.load_for_training(tmp_path / "t.mfmt", device="cuda", model=target, optimizer=fresh)
    assert [id(p) for p in target.parameters()] == [id(p) for p in fresh.param_groups[0]["params"]]
    x = torch.randn(3, 16, device="cuda")
    assert torch.equal(target(x), model(x))
    built = MettaAgent.load(tmp_path / "t.mfmt", device="cuda")
    assert all(p.device.type == "cuda" for p in built.parameters())
    assert torch.equal(built(x), model(x))
