"""Lazy open plus one tensor: mettaformat against ``safetensors.safe_open``, by tensor count.

Usage::

    python -m benchmarks.bench_open [--counts 27 256 2048] [--rounds 200] [--dir /tmp]

For each count, a state dict of that many small float32 tensors (shapes like a policy's: rank 1 and
2) is saved in both formats; then ``open + get_tensor(first)`` runs alternately on each side (A B,
then B A, ...), after a warm-up, and the per-round ratio mettaformat / safetensors is reported as
median, min and max. Both files stay in page cache. ``verify=True`` also hashes the tensor read;
``verify=False`` is the like-for-like comparison (safetensors checks no checksum).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import mettaformat


def state_dict(count: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for i in range(count):
        shape = (16, 8) if i % 2 else (16,)
        out[f"layers.{i // 2}.{'weight' if i % 2 else 'bias'}"] = torch.randn(shape)
    return out


def paired(a: Callable[[], Any], b: Callable[[], Any], rounds: int) -> dict[str, float]:
    def once(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for _ in range(5):
        once(a)
        once(b)
    ta: list[float] = []
    tb: list[float] = []
    gc.collect()
    for i in range(rounds):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        t1, t2 = once(first), once(second)
        ta.append(t1 if first is a else t2)
        tb.append(t2 if first is a else t1)
    ratios = [x / y for x, y in zip(ta, tb, strict=True)]
    return {"mf_us": statistics.median(ta) * 1e6, "st_us": statistics.median(tb) * 1e6,
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def measure(counts: list[int], rounds: int, workdir: Path) -> list[dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import save_file

    rows = []
    for count in counts:
        sd = state_dict(count)
        first = next(iter(sd))
        pm, ps = workdir / f"open-{count}.mfmt", workdir / f"open-{count}.safetensors"
        mettaformat.save_file(sd, pm)
        save_file(sd, str(ps))

        def st() -> torch.Tensor:
            with safe_open(str(ps), "pt") as f:
                return f.get_tensor(first)

        for verify in (False, True):
            def mf(v: bool = verify) -> torch.Tensor:
                with mettaformat.open(pm, verify=v) as f:
                    return f.get_tensor(first)

            rows.append({"tensors": count, "verify": verify, **paired(mf, st, rounds)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[27, 256, 2048])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        rows = measure(args.counts, args.rounds, Path(d))
    print("| tensors | verify | mettaformat µs | safe_open µs | ratio (median) | min | max |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tensors']} | {r['verify']} | {r['mf_us']:.0f} | {r['st_us']:.0f} | {r['ratio']:.2f}× "
              f"| {r['ratio_min']:.2f} | {r['ratio_max']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
