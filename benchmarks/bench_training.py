"""Training checkpoints: save and load time and size for a policy with Adam state.

mettaformat's ``save_for_training`` / ``load_for_training`` (pickle-free; raw and zstd)
against ``torch.save({"model": model, "optimizer": opt.state_dict()})`` and its ``torch.load``,
all measured in one run. ``python -m benchmarks.bench_training [--quick] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mettaformat
from benchmarks._harness import environment, markdown_table, timeit, write_json


class Policy(nn.Module):
    """A Metta-sized recurrent policy: conv encoder, LSTM core, actor and critic heads."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(22, 64, 5, 3), nn.ReLU(), nn.Conv2d(64, 64, 3, 1), nn.ReLU(), nn.Flatten())
        self.encoder = nn.Linear(64, hidden)
        self.core = nn.LSTM(hidden, hidden, num_layers=2)
        self.actor = nn.Linear(hidden, 100)
        self.critic = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.cnn(x))
        out, _ = self.core(h.unsqueeze(0))
        return self.actor(out[0]).sum() + self.critic(out[0]).sum()  # type: ignore[no-any-return]


def build(attrs: dict[str, Any], metadata: dict[str, Any], config: dict[str, Any]) -> nn.Module:
    return Policy(config.get("hidden", 256))


def trained(hidden: int, steps: int) -> tuple[Policy, torch.optim.Optimizer]:
    """A few Adam steps on a one-step loss (kept for reference; the benchmark uses
    :func:`benchmarks.rl_policy.trained_policy`, whose LSTM runs over rollouts: here ``weight_hh``
    and its Adam moments stay zero, which compresses twice as well as a real policy)."""
    torch.manual_seed(0)
    policy = Policy(hidden)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        policy(torch.randn(8, 22, 11, 11)).backward()
        opt.step()
    return policy, opt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=None, help="runs per timing (default 7; --quick: 3)")
    parser.add_argument("--hidden", type=int, nargs="+", default=None,
                        help="policy sizes (LSTM width; default 256 1024; --quick: 256)")
    args = parser.parse_args(argv)
    from benchmarks.rl_policy import trained_policy

    mettaformat.register_model_type("bench-policy", build, replace=True)
    repeat = args.repeat or (3 if args.quick else 7)
    rows, results = [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        for hidden in args.hidden or ((256,) if args.quick else (256, 1024)):
            policy, opt = trained_policy(hidden)  # benchmarks/rl_policy.py: seeded, 40 Adam steps
            params = sum(p.numel() for p in policy.parameters())
            agent = mettaformat.MettaAgent(policy, model_type="bench-policy", config={"hidden": hidden})
            counters = {"epoch": 10, "agent_step": 10_000}
            gc.freeze()
            cases = {}
            for compression in ("none", "zstd"):
                path = work / f"train-{hidden}-{compression}.mfmt"
                save = timeit(lambda path=path, c=compression: agent.save_for_training(
                    path, optimizer=opt, trainer_state=counters, compression=c), repeat)

                # A resuming trainer builds its model and optimizer from its config anyway; that is not
                # part of the load (torch.load skips it by unpickling the module instead).
                prepared: list[tuple[Policy, torch.optim.Optimizer]] = []

                def prepare() -> None:
                    target = Policy(hidden)
                    prepared[:] = [(target, torch.optim.Adam(target.parameters(), lr=1e-3))]

                def load(path: Path = path) -> Any:
                    target, fresh = prepared[0]
                    return mettaformat.MettaAgent.load_for_training(path, model=target, optimizer=fresh)

                cases[f"mettaformat {'raw' if compression == 'none' else 'zstd-3'}"] = (
                    path, save, timeit(load, repeat, setup=prepare))
            torch_path = work / f"train-{hidden}.pt"
            save = timeit(lambda: torch.save({"model": policy, "optimizer": opt.state_dict(), **counters},
                                             torch_path), repeat)

            def torch_load() -> Any:
                ckpt = torch.load(torch_path, weights_only=False)
                fresh = torch.optim.Adam(ckpt["model"].parameters(), lr=1e-3)
                fresh.load_state_dict(ckpt["optimizer"])
                return ckpt, fresh

            cases["torch.save (pickled module)"] = (torch_path, save, timeit(torch_load, repeat))
            base_load = cases["torch.save (pickled module)"][2].median
            for name, (path, save, load) in cases.items():
                size = os.path.getsize(path)
                rows.append([f"{params / 1e6:.2f} M", name, f"{size / 2**20:.2f} MiB",
                             f"{save.median * 1e3:.1f} ({save.min * 1e3:.1f}-{save.max * 1e3:.1f})",
                             f"{load.median * 1e3:.1f} ({load.min * 1e3:.1f}-{load.max * 1e3:.1f})",
                             f"{base_load / load.median:.2f}x"])
                results.append({"params": params, "format": name, "bytes": size, "save": save.as_ms(),
                                "load": load.as_ms()})
            gc.unfreeze()
    print("Training checkpoints (model + Adam state + counters + RNG), median ms of "
          f"{repeat} runs after a warm-up:\n")
    print(markdown_table(["params", "format", "size", "save ms (min-max)", "load ms (min-max)", "load speedup vs torch"],
                         rows))
    if args.json:
        write_json(args.json, {"environment": environment(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
