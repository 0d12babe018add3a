"""Training worker for the bit-exact resume test; run as a fresh process.

usage: python -m tests.workers.resume MODEL OPTIM MODE OUT [CKPT]
MODE: straight (N+M steps), first (N steps, save CKPT), resume (load CKPT, M steps).
"""

from __future__ import annotations

import random
import sys

import torch
from torch import nn

import mettaformat

N, M = 7, 5


class MLPPolicy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 4))
        self.register_buffer("obs_norm", torch.ones(12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / self.obs_norm)  # type: ignore[no-any-return]


class LSTMPolicy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(12, 16)
        self.core = nn.LSTM(16, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.core(torch.relu(self.encoder(x)))
        return self.head(out[:, -1])  # type: ignore[no-any-return]


def build(attrs: dict, metadata: dict, config: dict) -> nn.Module:  # type: ignore[type-arg]
    return LSTMPolicy() if config["arch"] == "lstm" else MLPPolicy()


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True)


def step(model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    # Data comes from every RNG a trainer touches, so each must be restored for bit-equality.
    x = torch.randn(8, 3, 12) if isinstance(model, LSTMPolicy) else torch.randn(8, 12)
    x = x * (1 + random.random())
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def main() -> None:
    arch, optim_kind, mode, out = sys.argv[1:5]
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    mettaformat.register_model_type("test-policy", build)
    torch.manual_seed(1234)
    random.seed(99)
    model = build({}, {}, {"arch": arch})
    model.train()
    opt = make_optimizer(optim_kind, model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    steps = N + M if mode == "straight" else N
    if mode == "resume":
        agent = mettaformat.MettaAgent.load_for_training(sys.argv[5], optimizer=None)
        model = agent.model
        model.train()
        opt = make_optimizer(optim_kind, model)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        agent = mettaformat.MettaAgent.load_for_training(sys.argv[5], model=model, optimizer=opt, scheduler=sched)
        assert agent.trainer_state["epoch"] == N
        steps = M
    for _ in range(steps):
        step(model, opt, sched)
    if mode == "first":
        agent = mettaformat.MettaAgent(model, model_type="test-policy", config={"arch": arch})
        agent.save_for_training(sys.argv[5], optimizer=opt, scheduler=sched, trainer_state={"epoch": N})
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, out)


if __name__ == "__main__":
    main()
