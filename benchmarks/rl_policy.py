"""A trained RL policy with its Adam state, made by a seeded script: a benchmark data set.

``python -m benchmarks.rl_policy [--hidden 512] [--steps 40]`` prints its size and timing.

The policy is :class:`benchmarks.bench_training.Policy` (conv encoder over Metta's 22x11x11
observation, a 2-layer LSTM core run over 8-step rollouts, actor and critic heads). It is trained for ``steps`` Adam
steps on seeded synthetic rollouts with an actor-critic loss (cross-entropy towards seeded
actions, weighted by seeded advantages, plus a value regression and an entropy bonus), so the
weights have moved away from their initialisation and ``exp_avg`` / ``exp_avg_sq`` hold real
first and second moments. Everything is fp32. The same seed gives the same tensors bit for bit
on the same torch build.

Sizes: ``hidden=256`` is 1.17 M parameters (14 MB with Adam state), ``hidden=512`` is
4.3 M parameters (52 MB with Adam state): the Metta-sized range.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks._harness import REPO_ROOT, Dataset
from benchmarks.bench_training import Policy


def train(hidden: int = 512, steps: int = 40, batch: int = 4, horizon: int = 8,
          seed: int = 0, after_step: Callable[[int, Policy, torch.optim.Adam], None] | None = None,
          ) -> tuple[Policy, torch.optim.Adam]:
    """A seeded actor-critic training run of ``steps`` Adam steps on ``batch`` rollouts of ``horizon`` steps.
    ``after_step(step, policy, optimizer)`` runs after each step (1-based), for saving snapshots.

    The LSTM runs over the whole rollout (backpropagation through time), so its recurrent weights
    get gradients too: with one-step sequences from a zero state, ``weight_hh`` and its Adam
    moments would stay exactly zero, which compresses far better than a real policy does.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    policy = Policy(hidden)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-4, eps=1e-5)
    for step in range(1, steps + 1):
        n = horizon * batch
        obs = torch.randn(n, 22, 11, 11, generator=gen)
        actions = torch.randint(0, 100, (n,), generator=gen)
        advantages = torch.randn(n, generator=gen)
        returns = torch.randn(n, generator=gen)
        h = policy.encoder(policy.cnn(obs)).reshape(horizon, batch, -1)
        out, _ = policy.core(h)
        out = out.reshape(n, -1)
        logits = policy.actor(out)
        value = policy.critic(out).squeeze(-1)
        logp = F.log_softmax(logits, dim=-1)
        pg = -(logp.gather(1, actions[:, None]).squeeze(1) * advantages).mean()
        entropy = -(logp.exp() * logp).sum(-1).mean()
        loss = pg + 0.5 * F.mse_loss(value, returns) - 0.01 * entropy
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
        opt.step()
        if after_step is not None:
            after_step(step, policy, opt)
    return policy, opt


def tensors(policy: Policy, opt: torch.optim.Adam) -> dict[str, torch.Tensor]:
    """The policy's state dict plus ``optimizer.<param>.exp_avg`` / ``exp_avg_sq`` / ``step``."""
    out = {f"policy.{k}": v.detach().clone() for k, v in policy.state_dict().items()}
    names = {id(p): n for n, p in policy.named_parameters()}
    for p, state in opt.state.items():
        name = names[id(p)]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                v = state[key]
                out[f"optimizer.{name}.{key}"] = (v if isinstance(v, torch.Tensor) else torch.tensor(v)).detach().clone()
    return out


def rl_policy_dataset(hidden: int = 512, steps: int = 40, seed: int = 0, *, cache: bool = True) -> Dataset:
    """The data set, from ``bench-out/cache/`` when this exact (hidden, steps, seed, torch) was trained before.

    Training takes 5 to 15 s on 2 busy cores; the cache (a safetensors file, git-ignored) only
    skips that wait. ``cache=False`` or ``METTAFORMAT_BENCH_NO_CACHE=1`` always retrains.
    """
    from safetensors.torch import load_file, save_file

    cache = cache and not os.environ.get("METTAFORMAT_BENCH_NO_CACHE")
    path = REPO_ROOT / "bench-out" / "cache" / f"rl-policy-h{hidden}-s{steps}-seed{seed}-torch{torch.__version__}.safetensors"
    sd: dict[str, torch.Tensor] | None = None
    how = "trained now"
    if cache and path.exists():
        try:
            sd = {k: v.clone() for k, v in load_file(str(path)).items()}
            how = f"cached in {path.relative_to(REPO_ROOT)}"
        except Exception:
            sd = None
    if sd is None:
        policy, opt = train(hidden, steps, seed=seed)
        sd = tensors(policy, opt)
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file(sd, str(tmp))
            os.replace(tmp, path)
    params = sum(v.numel() for k, v in sd.items() if k.startswith("policy."))
    return Dataset(f"rl-policy-adam-{params / 1e6:.1f}M", sd,
                   f"benchmarks/rl_policy.py: Policy(hidden={hidden}), {params / 1e6:.2f} M params, "
                   f"{steps} seeded Adam steps; weights + exp_avg + exp_avg_sq, fp32 ({how})")


def trained_policy(hidden: int = 512, steps: int = 40, seed: int = 0) -> tuple[Policy, torch.optim.Adam]:
    """The trained policy and its Adam optimizer, rebuilt from :func:`rl_policy_dataset` (cached)."""
    sd = rl_policy_dataset(hidden, steps, seed).tensors
    policy = Policy(hidden)
    policy.load_state_dict({k.removeprefix("policy."): v for k, v in sd.items() if k.startswith("policy.")})
    opt = torch.optim.Adam(policy.parameters(), lr=3e-4, eps=1e-5)
    names = [n for n, _ in policy.named_parameters()]
    state = {i: {key: sd[f"optimizer.{n}.{key}"] for key in ("step", "exp_avg", "exp_avg_sq")}
             for i, n in enumerate(names) if f"optimizer.{n}.exp_avg" in sd}
    group = {k: v for k, v in opt.state_dict()["param_groups"][0].items()}
    opt.load_state_dict({"state": state, "param_groups": [group]})
    return policy, opt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--no-cache", action="store_true", help="retrain; do not read or write bench-out/cache")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    ds = rl_policy_dataset(args.hidden, args.steps, cache=not args.no_cache)
    print(f"{ds.name}: {len(ds.tensors)} tensors, {ds.nbytes / 1e6:.1f} MB, made in {time.perf_counter() - t0:.1f} s")
    print(ds.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
