"""The agent-level API: save/load, reconstruction, training checkpoints, DDP, export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mettaformat
from mettaformat import MettaAgent, ModelReconstructionError
from tests.conftest import REPO


class TinyPolicy(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(4, hidden)
        self.components = nn.ModuleDict({"_core_": nn.LSTM(hidden, hidden), "_value_": nn.Linear(hidden, 1)})
        self.register_buffer("running", torch.arange(3.0))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # type: ignore[no-any-return]


def build_tiny(attrs: dict[str, Any], metadata: dict[str, Any], config: dict[str, Any]) -> nn.Module:
    return TinyPolicy(hidden=config.get("hidden", 8))


mettaformat.register_model_type("tiny", build_tiny, replace=True)


def make_agent() -> MettaAgent:
    torch.manual_seed(0)
    return MettaAgent(TinyPolicy(hidden=6), model_type="tiny", name="run_a", uri="file:///runs/a",
                      metadata={"epoch": 5, "agent_step": 640, "action_names": ["move", "turn"], "score": 0.25},
                      agent_attributes={"obs_shape": (200, 3), "clip_range": 0.0}, config={"hidden": 6})


def test_save_and_load_rebuilds_a_registered_model(tmp_path: Path) -> None:
    agent = make_agent()
    agent.observation_space_version = "v1"
    path = agent.save(tmp_path / "model_0005.mfmt")
    assert path is not None
    loaded = MettaAgent.load(path, device="cpu")
    assert isinstance(loaded.model, TinyPolicy) and loaded.model.fc.out_features == 6
    for (k, a), (k2, b) in zip(agent.model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    assert loaded.metadata == agent.metadata
    assert loaded.agent_attributes == {"obs_shape": (200, 3), "clip_range": 0.0}
    assert loaded.name == "run_a" and loaded.uri == "file:///runs/a" and loaded.model_type == "tiny"
    assert loaded.config == {"hidden": 6} and loaded.observation_space_version == "v1"
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), agent(x))


def test_unknown_model_type_raises_with_instructions(tmp_path: Path) -> None:
    agent = MettaAgent(TinyPolicy(), model_type="never-registered")
    agent.save(tmp_path / "m.mfmt")
    with pytest.raises(ModelReconstructionError, match="register_model_type\\('never-registered'"):
        MettaAgent.load(tmp_path / "m.mfmt")


def test_weights_that_do_not_fit_raise_reconstruction_error(tmp_path: Path) -> None:
    make_agent().save(tmp_path / "m.mfmt")
    with pytest.raises(ModelReconstructionError, match="does not fit"):
        MettaAgent.load(tmp_path / "m.mfmt", model=TinyPolicy(hidden=3))


def test_load_into_a_given_model_and_lazy_views(tmp_path: Path) -> None:
    agent = make_agent()
    agent.save(tmp_path / "m.mfmt")
    target = TinyPolicy(hidden=6)
    loaded = MettaAgent.load(tmp_path / "m.mfmt", model=target, lazy=True)
    assert loaded.model is target
    assert torch.equal(target.fc.weight, agent.model.fc.weight)
    assert target.fc.weight.requires_grad  # assign=True keeps Parameters trainable
    target.fc.weight.data.add_(1)  # private mapping: the file is unchanged
    again = MettaAgent.load(tmp_path / "m.mfmt")
    assert torch.equal(again.model.fc.weight, agent.model.fc.weight)


def test_compiled_and_wrapped_models_are_unwrapped_on_save(tmp_path: Path) -> None:
    policy = TinyPolicy(hidden=6)
    compiled = torch.compile(policy)
    MettaAgent(compiled, model_type="tiny", config={"hidden": 6}).save(tmp_path / "c.mfmt")
    with mettaformat.open(tmp_path / "c.mfmt") as f:
        assert not any(k.startswith("_orig_mod") for k in f.keys())
        assert set(f.keys()) == set(policy.state_dict())


def test_export_for_inference_is_minimal(tmp_path: Path) -> None:
    agent = make_agent()
    agent.export_for_inference(tmp_path / "prod.mfmt")
    ckpt = mettaformat.load_any(tmp_path / "prod.mfmt")
    assert ckpt.metadata == {"action_names": ["move", "turn"]}
    assert ckpt.training is None and ckpt.model_type == "tiny"
    assert MettaAgent.load(tmp_path / "prod.mfmt").config == {"hidden": 6}


def test_training_checkpoint_round_trip_in_process(tmp_path: Path) -> None:
    agent = make_agent()
    opt = torch.optim.Adam(agent.parameters(), lr=1e-3)
    agent(torch.randn(3, 4)).sum().backward()
    opt.step()
    agent.save_for_training(tmp_path / "t.mfmt", optimizer=opt, trainer_state={"epoch": 5, "agent_step": 640})
    with mettaformat.open(tmp_path / "t.mfmt") as f:
        assert {"model", "optimizer", "rng"} <= set(f.sections)
    data = (tmp_path / "t.mfmt").read_bytes()
    assert b"\x80\x02" not in data[:64] and b"PK\x03\x04" not in data  # not a pickle, not a torch zip
    model2 = TinyPolicy(6)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
    loaded = MettaAgent.load_for_training(tmp_path / "t.mfmt", model=model2, optimizer=opt2)
    assert loaded.trainer_state == {"epoch": 5, "agent_step": 640}
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i, st in s1["state"].items():
        for k, v in st.items():
            assert torch.equal(v, s2["state"][i][k])


def _run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], cwd=REPO, check=True, timeout=300)


@pytest.mark.parametrize(("arch", "optim"), [("mlp", "adam"), ("mlp", "sgd"), ("lstm", "adam")])
def test_resume_in_a_fresh_process_is_bit_exact(tmp_path: Path, arch: str, optim: str) -> None:
    straight, resumed, ckpt = tmp_path / "straight.pt", tmp_path / "resumed.pt", tmp_path / "ckpt.mfmt"
    _run("tests.workers.resume", arch, optim, "straight", str(straight))
    _run("tests.workers.resume", arch, optim, "first", str(tmp_path / "first.pt"), str(ckpt))
    _run("tests.workers.resume", arch, optim, "resume", str(resumed), str(ckpt))
    a, b = torch.load(straight), torch.load(resumed)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_ddp_only_rank_zero_writes(tmp_path: Path) -> None:
    _run("tests.workers.ddp_save", str(tmp_path))
    assert (tmp_path / "rank0.txt").read_text() == "wrote"
    assert (tmp_path / "rank1.txt").read_text() == "skipped"
    expected = torch.load(tmp_path / "expected.pt")
    loaded = mettaformat.load_file(tmp_path / "policy.mfmt")
    assert loaded.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(loaded[k], v)


@pytest.mark.parametrize("how", ["no model", "another model's optimizer"])
def test_an_optimizer_that_would_not_drive_the_loaded_model_is_refused(tmp_path: Path, how: str) -> None:
    agent = make_agent()
    opt = torch.optim.Adam(agent.parameters(), lr=1e-3)
    agent.save_for_training(tmp_path / "t.mfmt", optimizer=opt, trainer_state={"epoch": 1})
    model = TinyPolicy(6)
    stray = torch.optim.Adam(TinyPolicy(6).parameters(), lr=1e-3)
    kwargs: dict[str, Any] = {"optimizer": stray} if how == "no model" else {"model": model, "optimizer": stray}
    with pytest.raises(ValueError, match=r"model=model, optimizer=optimizer"):
        MettaAgent.load_for_training(tmp_path / "t.mfmt", **kwargs)
    # The documented way: the optimizer is built over the model that is then filled.
    good = torch.optim.Adam(model.parameters(), lr=0.5)
    loaded = MettaAgent.load_for_training(tmp_path / "t.mfmt", model=model, optimizer=good)
    before = [p.detach().clone() for p in loaded.parameters()]
    loaded(torch.randn(3, 4)).sum().backward()
    good.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, loaded.parameters(), strict=True))
