"""Legacy import vs ``torch.load``, and file sizes before and after migration, per Metta fixture.

Usage::

    python -m benchmarks.bench_legacy [--json OUT] [--repeat 7]

For each file in ``../shared/fixtures/metta``:

- ``import_legacy`` (our pickle VM; nothing executed) in this process;
- ``torch.load(weights_only=False)`` of the same file in a subprocess (one for all files) where a meta-path finder
  supplies stand-in classes for every Metta/gym/omegaconf/tensordict name (this process never
  imports them), timed inside the subprocess;
- the v1 re-export (``export_v1``) and the sizes of the ``.pt``, the ``.mfmt`` (raw) and the
  ``.mfmt`` (zstd level 3).

Timings are medians of ``--repeat`` runs after one warm-up, files in page cache.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from benchmarks._harness import FIXTURES_METTA, environment, markdown_table, timeit, write_json
from mettaformat.checkpoint_io import write_checkpoint
from mettaformat.legacy import import_legacy
from mettaformat.legacy.export import export_v1
from mettaformat.legacy.graph import storable_checkpoint

TORCH_LOAD = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, json, statistics, sys, time, types
    import torch, torch.nn as nn

    from tests.legacy_helpers.standins import install
    install()
    repeat, paths = int(sys.argv[1]), sys.argv[2:]
    out = {}
    for path in paths:
        torch.load(path, weights_only=False, map_location="cpu")  # warm-up (imports, page cache)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            torch.load(path, weights_only=False, map_location="cpu")
            times.append(time.perf_counter() - t0)
        out[path] = {"median": statistics.median(times), "min": min(times), "max": max(times)}
    print(json.dumps(out))
    """
)


def torch_load_ms(paths: list[Path], repeat: int) -> dict[str, dict[str, float]]:
    """``torch.load(weights_only=False)`` of each file, timed in one child process (one torch import)."""
    out = subprocess.run(
        [sys.executable, "-c", TORCH_LOAD, str(repeat), *map(str, paths)], capture_output=True, text=True, check=True
    )
    return {p: {k: v * 1e3 for k, v in t.items()} for p, t in json.loads(out.stdout).items()}


def bench_file(path: Path, workdir: Path, repeat: int, theirs: dict[str, float]) -> dict[str, Any]:
    ckpt = import_legacy(path)
    ours = timeit(lambda: import_legacy(path), repeat, 1)
    raw, zstd, v1 = workdir / f"{path.stem}.mfmt", workdir / f"{path.stem}.zstd.mfmt", workdir / f"{path.stem}.v1.pt"
    storable = storable_checkpoint(ckpt)
    write_raw = timeit(lambda: write_checkpoint(storable, raw), repeat, 1)
    write_checkpoint(storable, zstd, compression="zstd")
    export = timeit(lambda: export_v1(ckpt, v1), repeat, 1)
    return {
        "file": path.name,
        "shape": ckpt.provenance.get("shape"),
        "tensors": len(ckpt.tensors),
        "import_legacy_ms": ours.as_ms(),
        "torch_load_ms": theirs,
        "speedup_vs_torch_load": theirs["median"] / (ours.median * 1e3),
        "write_mfmt_raw_ms": write_raw.as_ms(),
        "export_v1_ms": export.as_ms(),
        "bytes": {"pt": path.stat().st_size, "mfmt_raw": raw.stat().st_size, "mfmt_zstd": zstd.stat().st_size,
                  "v1_reexport": v1.stat().st_size},
    }


def legacy_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One target row per v1 policy-record fixture: import_legacy time ÷ torch.load time, goal ≤ 1."""
    out = []
    for r in results:
        if r["shape"] != "v1-policy-record":
            continue
        ours, theirs = r["import_legacy_ms"], r["torch_load_ms"]
        v = ours["median_ms"] / theirs["median"]
        vmin = ours["min_ms"] / theirs["min"]
        out.append({"area": "legacy", "target": "import a v1 Metta file: import_legacy ÷ torch.load(weights_only=False)",
                    "dataset": f"{r['file']} ({r['bytes']['pt'] / 1e6:.1f} MB)", "value": v, "value_from_min": vmin,
                    "value_interleaved": None, "goal": "≤ 1.0", "met": v <= 1.0, "noisy": (v <= 1.0) != (vmin <= 1.0),
                    "detail": f"{ours['median_ms']:.1f} vs {theirs['median']:.1f} ms"})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--repeat", type=int, default=None, help="runs per timing (default 7; --quick: 3)")
    parser.add_argument("--quick", action="store_true", help="3 runs per timing")
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (3 if args.quick else 7)
    files = sorted(FIXTURES_METTA.glob("*.pt"))
    if not files:
        print(f"no fixtures in {FIXTURES_METTA}", file=sys.stderr)
        return 1
    gc.freeze()
    with tempfile.TemporaryDirectory() as tmp:
        theirs = torch_load_ms(files, args.repeat)
        results = [bench_file(f, Path(tmp), args.repeat, theirs[str(f)]) for f in files]
    rows = []
    for r in results:
        b = r["bytes"]
        rows.append([
            r["file"], r["shape"], r["tensors"],
            f"{r['import_legacy_ms']['median_ms']:.1f}", f"{r['torch_load_ms']['median']:.1f}",
            f"{r['speedup_vs_torch_load']:.2f}x", f"{r['export_v1_ms']['median_ms']:.1f}",
            f"{b['pt'] / 1e6:.2f}", f"{b['mfmt_raw'] / b['pt']:.3f}", f"{b['mfmt_zstd'] / b['pt']:.3f}",
        ])
    print(markdown_table(
        ["file", "shape", "tensors", "import_legacy ms", "torch.load ms", "torch/ours", "export_v1 ms",
         ".pt MB", "mfmt raw / .pt", "mfmt zstd / .pt"],
        rows,
    ))
    found = legacy_targets(results)
    if found:
        print("\nTarget (BENCH.md): importing a v1 Metta file no slower than `torch.load(weights_only=False)` with "
              "the original classes present (stand-ins here):\n")
        print(markdown_table(["file", "import_legacy ÷ torch.load (medians)", "(mins)", "result"],
                             [[t["dataset"], f"{t['value']:.2f}", f"{t['value_from_min']:.2f}",
                               ("met" if t["met"] else "**not met**") + (" (noisy)" if t["noisy"] else "")]
                              for t in found]))
    if args.json:
        write_json(args.json, {"environment": environment(), "repeat": args.repeat, "results": results,
                               "targets": found})
    return 0


if __name__ == "__main__":
    sys.exit(main())
