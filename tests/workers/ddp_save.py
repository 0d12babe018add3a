"""Two-process gloo group: every rank calls agent.save; only rank 0 may write.

usage: python -m tests.workers.ddp_save TMPDIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mettaformat


def worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ddp = nn.parallel.DistributedDataParallel(module)
    loss = ddp(torch.randn(3, 4) + rank).sum()
    loss.backward()  # gradients all-reduced: both ranks hold identical modules
    agent = mettaformat.MettaAgent(ddp, model_type="ddp-test")
    written = agent.save(Path(tmp) / "policy.mfmt")
    Path(tmp, f"rank{rank}.txt").write_text("wrote" if written is not None else "skipped")
    if rank == 0:
        torch.save(module.state_dict(), Path(tmp) / "expected.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2, join=True)
