"""The main job, end to end in under a minute: ``./dev demo`` (or ``python -m mettaformat.demo``).

1. train a tiny policy for a few seconds;
2. save it as a standard, a training and a compressed checkpoint, and load each back;
3. import a real Metta legacy checkpoint without executing anything in it;
4. select the best of several checkpoints by score, reading headers only;
5. print a size / load-time table against safetensors and torch.save.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mettaformat
from mettaformat import MettaAgent
from mettaformat.bench import compare_formats, markdown_table

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "metta" / "v1_era_d_model_0050.pt"


class BanditPolicy(nn.Module):
    """A small actor-critic MLP over 8 observation features and 4 actions."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.actor = nn.Linear(hidden, 4)
        self.critic = nn.Linear(hidden, 1)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(obs)
        return self.actor(h), self.critic(h).squeeze(-1)


def build_bandit(attrs: dict[str, Any], metadata: dict[str, Any], config: dict[str, Any]) -> nn.Module:
    return BanditPolicy(hidden=int(config.get("hidden", 64)))


def train(seconds: float) -> tuple[MettaAgent, torch.optim.Optimizer, dict[str, Any]]:
    """Policy gradient on a contextual bandit: the best action is the argmax of a hidden linear map."""
    torch.manual_seed(0)
    target = torch.randn(8, 4)
    policy = BanditPolicy()
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    rewards: list[float] = []
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        obs = torch.randn(256, 8)
        logits, value = policy(obs)
        dist = torch.distributions.Categorical(logits=logits)
        action = dist.sample()  # type: ignore[no-untyped-call]
        reward = (action == (obs @ target).argmax(-1)).float()
        advantage = reward - value.detach()
        log_prob = dist.log_prob(action)  # type: ignore[no-untyped-call]
        loss = -(log_prob * advantage).mean() + 0.5 * (reward - value).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        rewards.append(reward.mean().item())
        steps += 1
    score = statistics.fmean(rewards[-20:])
    print(f"1. trained a {sum(p.numel() for p in policy.parameters()):,}-parameter policy for {steps} steps "
          f"({time.perf_counter() - start:.1f} s): reward {statistics.fmean(rewards[:20]):.2f} -> {score:.2f}")
    agent = MettaAgent(policy, model_type="demo-bandit", name="demo", config={"hidden": 64},
                       metadata={"epoch": steps, "agent_step": steps * 256, "score": score,
                                 "action_names": ["noop", "move", "rotate", "attack"]})
    return agent, opt, {"epoch": steps, "agent_step": steps * 256}


def save_and_reload(agent: MettaAgent, opt: torch.optim.Optimizer, counters: dict[str, Any], out: Path) -> None:
    standard, compressed, training = out / "policy.mfmt", out / "policy.zstd.mfmt", out / "training.mfmt"
    agent.save(standard)
    agent.save(compressed, compression="zstd")
    agent.save_for_training(training, optimizer=opt, trainer_state=counters)
    obs = torch.randn(4, 8)
    for path in (standard, compressed):
        loaded = MettaAgent.load(path)
        assert torch.equal(loaded(obs)[0], agent(obs)[0])
    model = MettaAgent.load(standard).model  # the optimizer must drive the model it resumes
    resumed = MettaAgent.load_for_training(training, model=model, optimizer=torch.optim.Adam(
        model.parameters(), lr=3e-3))
    print(f"2. saved standard ({_kib(standard)}), compressed ({_kib(compressed)}) and training "
          f"({_kib(training)}, with Adam state and RNG) checkpoints; all reload identically "
          f"(resume at epoch {resumed.trainer_state['epoch']})")


def import_legacy(out: Path) -> dict[str, torch.Tensor]:
    if FIXTURE.exists():
        source, note = FIXTURE, "a real Metta v1 PolicyRecord (July 2025)"
    else:
        source, note = out / "legacy_v2.pt", "a synthesised Metta v2 checkpoint (fixtures not found)"
        torch.manual_seed(1)
        torch.save({"model_state_dict": BanditPolicy(256).state_dict(), "model_type": "brain", "name": "legacy",
                    "uri": "file://legacy_v2.pt", "metadata": {"epoch": 50, "agent_step": 57600},
                    "checkpoint_format_version": 2}, source)
    start = time.perf_counter()
    ckpt = mettaformat.load_any(source, migrate=False)
    elapsed = time.perf_counter() - start
    params = sum(t.numel() for t in ckpt.tensors.values())
    print(f"3. imported {note} in {elapsed * 1000:.0f} ms without running any code from it: "
          f"shape {ckpt.provenance.get('shape')!r}, {len(ckpt.tensors)} tensors, {params:,} parameters, "
          f"epoch {ckpt.metadata.get('epoch')}, actions {ckpt.metadata.get('action_names', [])[:3]}...")
    return {k: v.contiguous() for k, v in ckpt.tensors.items()}


def select_best(agent: MettaAgent, out: Path) -> None:
    from mettaformat.store import PolicyStore

    root = out / "checkpoints"
    root.mkdir()
    store = PolicyStore(root)
    for epoch, score in ((10, 0.31), (20, 0.52), (30, 0.47), (40, 0.66), (50, 0.58)):
        store.save(agent=agent, metadata={"epoch": epoch, "score": score})
    best = store.policies(str(root), n=2, metric="score", selector="top")
    latest = store.policies(str(root), selector="latest")
    print(f"4. from 5 checkpoints, top 2 by score: {[(a.metadata['epoch'], a.metadata['score']) for a in best]}; "
          f"latest: epoch {latest[0].metadata['epoch']} (headers only; weights loaded for the winners)")


def _kib(path: Path) -> str:
    return f"{path.stat().st_size / 1024:.1f} KiB"


def table(weights: dict[str, torch.Tensor], out: Path) -> None:
    raw_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    results = compare_formats(weights, out)
    print(f"5. {len(weights)} tensors, {raw_bytes / 2**20:.2f} MiB of weights (medians of 7 runs after a warm-up, "
          "files in page cache):")
    print()
    print(markdown_table(results, raw_bytes))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="training time")
    parser.add_argument("--out", type=Path, help="keep the files here (default: a temp dir)")
    args = parser.parse_args(argv)
    mettaformat.register_model_type("demo-bandit", build_bandit, replace=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        agent, opt, counters = train(args.seconds)
        save_and_reload(agent, opt, counters, out)
        weights = import_legacy(out)
        select_best(agent, out)
        table(weights, out)
        if args.out:
            print(f"\ndone in {time.perf_counter() - start:.1f} s; try: mettaformat inspect {out / 'policy.mfmt'}")
        else:
            print(f"\ndone in {time.perf_counter() - start:.1f} s (rerun with --out DIR to keep the files)")


if __name__ == "__main__":
    main()
