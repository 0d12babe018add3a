"""Two-rank gloo jobs for the distributed checkpoint tests (run with torch.multiprocessing.spawn).

Every rank builds the same deterministic full state, shards it, saves and loads; results that
the parent checks are written next to the checkpoints as containers, never as pickles.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import mettaformat
from mettaformat.container.writer import write_container
from mettaformat.dcp import MettaStorageReader, MettaStorageWriter

WORLD = 2
COUNTERS = {"epoch": 2, "agent_step": 8192, "per_env": {3: 0.5}}


def full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "layer.weight": torch.randn(10, 6, generator=g),
        "layer.bias": torch.randn(10, generator=g).to(torch.bfloat16),
        "counts": torch.arange(24, dtype=torch.int64).reshape(4, 6),
        "mask": torch.rand(6, 4, generator=g) > 0.5,
    }


def objects() -> dict[str, Any]:
    rng = random.Random(3)
    return {
        "step": 1234,
        "trainer": {"lr": 3e-4, "name": "ppo", "betas": (0.9, 0.999), "milestones": [10, 20], "big": 1 << 70},
        "python_rng": rng.getstate(),
    }


def empty_objects() -> dict[str, Any]:
    # DCP loads the keys the target state dict has, so the placeholders name every key
    return {"step": 0, "trainer": dict.fromkeys(objects()["trainer"]), "python_rng": None}


def shard(full: dict[str, torch.Tensor], mesh: Any, dim: int) -> dict[str, Any]:
    # 1-D tensors can only be split along dim 0
    return {k: distribute_tensor(v, mesh, [Shard(min(dim, v.dim() - 1))]) for k, v in full.items()}


def _init(rank: int, tmp: str, name: str) -> Any:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv-{name}", rank=rank, world_size=WORLD)
    return init_device_mesh("cpu", (WORLD,))


def reshard_job(rank: int, tmp: str) -> None:
    """Save with Shard(0) and (async) with Shard(1); load each into the other layout; FSDP2 model + optimizer."""
    mesh = _init(rank, tmp, "reshard")
    root = Path(tmp)
    full = full_tensors()
    dcp.save({**shard(full, mesh, 0), **objects()}, storage_writer=MettaStorageWriter(root / "dim0"))
    future = dcp.async_save({**shard(full, mesh, 1), **objects()}, storage_writer=MettaStorageWriter(root / "dim1"))
    future.result()
    for saved, dim in (("dim0", 1), ("dim1", 0)):
        target = {**shard({k: torch.zeros_like(v) for k, v in full.items()}, mesh, dim), **empty_objects()}
        dcp.load(target, storage_reader=MettaStorageReader(root / saved))
        loaded = {k: target[k].full_tensor() for k in full}
        # each rank checks its own local shards too, not only the gathered whole
        for k, v in full.items():
            local = target[k].to_local()
            expected = distribute_tensor(v, mesh, target[k].placements).to_local()
            assert torch.equal(local.view(torch.uint8), expected.view(torch.uint8)), (saved, k)
        if rank == 0:
            write_container(root / f"loaded-{saved}-on-2.mfmt", {"model": loaded},
                                        metadata={"objects": {k: target[k] for k in empty_objects()}})
    _fsdp(rank, mesh, root)
    dist.barrier()
    dist.destroy_process_group()


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _fsdp(rank: int, mesh: Any, root: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    def sharded(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = build_model(seed)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optim = torch.optim.Adam(model.parameters(), lr=0.01)
        model(torch.ones(3, 8)).sum().backward()
        optim.step()
        return model, optim

    model, optim = sharded(0)
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd, "step": 5}, storage_writer=MettaStorageWriter(root / "fsdp"))
    model2, optim2 = sharded(1)
    msd2, osd2 = get_state_dict(model2, optim2)
    state = {"model": msd2, "optim": osd2, "step": 0}
    dcp.load(state, storage_reader=MettaStorageReader(root / "fsdp"))
    set_state_dict(model2, optim2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert state["step"] == 5
    after, optim_after = get_state_dict(model2, optim2)
    for k, v in msd.items():
        assert torch.equal(after[k].full_tensor(), v.full_tensor()), k
    for pk, pstate in osd["state"].items():
        for sk, sv in pstate.items():
            got = optim_after["state"][pk][sk]
            got = got.full_tensor() if hasattr(got, "full_tensor") else got
            want = sv.full_tensor() if hasattr(sv, "full_tensor") else sv
            assert torch.equal(got, want), (pk, sk)
    assert optim_after["param_groups"] == osd["param_groups"]
    full = {k: v.full_tensor() for k, v in msd.items()}
    if rank == 0:
        mettaformat.save_file(full, root / "fsdp-expected.mfmt")

    # The same job through MettaAgent: every rank saves its shards and resumes its own RNG.
    torch.manual_seed(100 + rank)
    agent = mettaformat.MettaAgent(model, model_type="mlp", metadata={"epoch": 2})
    agent.save_for_training(root / "agent", optim, trainer_state=COUNTERS, distributed=True)
    expected_next = torch.rand(4)
    model3, optim3 = sharded(3)
    resumed = mettaformat.MettaAgent.load_for_training(root / "agent", model=model3, optimizer=optim3,
                                                       distributed=True)
    assert torch.equal(torch.rand(4), expected_next)
    assert resumed.trainer_state == COUNTERS and resumed.metadata == {"epoch": 2}
    resumed_sd, _ = get_state_dict(model3, optim3)
    for k, v in msd.items():
        assert torch.equal(resumed_sd[k].full_tensor(), v.full_tensor()), k


class DyingWriter(MettaStorageWriter):
    """Rank 1 dies in the middle of the save, once rank 0's new file is on disk."""

    def write_data(self, plan: Any, planner: Any) -> Any:
        if dist.get_rank() == 1:
            save_id = plan.storage_data.file.split("_")[-1]
            deadline = time.monotonic() + 30
            while not (self.path / f"__0_{save_id}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            os._exit(3)
        return super().write_data(plan, planner)


def killed_job(rank: int, tmp: str) -> None:
    """Commit a first save, then die on rank 1 during the second one."""
    mesh = _init(rank, tmp, "killed")
    root = Path(tmp) / "ckpt"
    full = full_tensors()
    dcp.save({**shard(full, mesh, 0), "step": 1}, storage_writer=MettaStorageWriter(root))
    dist.barrier()
    doubled = {k: v * 2 if v.dtype != torch.bool else ~v for k, v in full.items()}
    dcp.save({**shard(doubled, mesh, 0), "step": 2}, storage_writer=DyingWriter(root))
