"""Legacy import vs ``torch.load``, and file sizes before and after migration, per Metta fixture.

Usage::

    python -m benchmarks.bench_legacy [--json OUT] [--repeat 15] [--baseline DIR] [--parts] [--profile] [FILE...]

For each file (default: every ``*.pt`` in ``../shared/fixtures/metta``):

- ``import_legacy`` (our pickle VM; nothing executed) and ``torch.load(weights_only=False)`` of the
  same file, timed round-robin in one child process, so that the ratio is measured under the same
  machine load. The child's meta-path finder supplies stand-in classes for every Metta/gym/omegaconf
  name (this process never imports them). Only run this on trusted fixtures.
- ``--baseline DIR``: a copy of the ``mettaformat/legacy`` package whose own imports were rewritten
  to ``<basename of DIR>.<module>``; its ``import_legacy`` joins the same round-robin (before/after
  from one run).
- ``--parts``: where an import spends its time (read, zip validation with and without CRCs, the
  pickle VM with storages and tensor rebuilds, the recognisers); ``--profile``: a cProfile of it.
- the v1 re-export (``export_v1``) and the sizes of the ``.pt``, the ``.mfmt`` (raw) and the
  ``.mfmt`` (zstd level 3).

Timings are medians (and minima) of ``--repeat`` runs after one warm-up, files in page cache.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from benchmarks._harness import FIXTURES_METTA, REPO_ROOT, environment, markdown_table, timeit, write_json
from mettaformat.checkpoint_io import write_checkpoint
from mettaformat.legacy import import_legacy
from mettaformat.legacy.export import export_v1
from mettaformat.legacy.graph import storable_checkpoint

#: Runs in a child process: times every contender round-robin, prints JSON.
ROUND_ROBIN = textwrap.dedent(
    """
    import gc, importlib, json, statistics, sys, time
    import torch
    from mettaformat.legacy import import_legacy
    from tests.legacy_helpers.standins import install

    install()
    repeat, baseline, paths = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    contenders = {"import_legacy": import_legacy,
                  "torch.load": lambda p: torch.load(p, weights_only=False, map_location="cpu")}
    if baseline:
        sys.path.insert(0, baseline.rsplit("/", 1)[0])
        contenders["baseline import_legacy"] = importlib.import_module(baseline.rsplit("/", 1)[1]).import_legacy
    out = {}
    for path in paths:
        times = {k: [] for k in contenders}
        for f in contenders.values():
            f(path)  # warm-up (imports, page cache)
        for _ in range(repeat):
            for name, f in contenders.items():
                gc.collect()  # no run pays for another's garbage
                t0 = time.perf_counter()
                f(path)
                times[name].append(time.perf_counter() - t0)
        out[path] = {k: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3} for k, v in times.items()}
    print(json.dumps(out))
    """
)


def round_robin(paths: list[Path], repeat: int, baseline: str | None) -> dict[str, dict[str, dict[str, float]]]:
    """``import_legacy``, ``torch.load`` (and the baseline) of each file, interleaved in one child process."""
    out = subprocess.run(
        [sys.executable, "-c", ROUND_ROBIN, str(repeat), baseline or "", *map(str, paths)],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def parts(path: Path, repeat: int) -> dict[str, dict[str, float | int]]:
    """Time each stage of an import separately, as ``import_legacy`` runs them (collector paused)."""
    from mettaformat.legacy.metta import LoadedPickle, to_checkpoint
    from mettaformat.legacy.torchzip import load_torch_zip, open_torch_zip

    def read() -> bytearray:
        return bytearray(path.read_bytes())

    buf = read()
    zip_ = open_torch_zip(buf)
    value, seen = load_torch_zip(zip_)
    stages = {
        "read file": read,
        "open_torch_zip (with CRCs)": lambda: open_torch_zip(buf),
        "load_torch_zip (VM + tensors)": lambda: load_torch_zip(zip_),
        "to_checkpoint (recognisers)": lambda: to_checkpoint(LoadedPickle(value, seen, "torch-zip", {})),
    }
    gc.disable()
    try:
        return {name: timeit(fn, repeat, 1).as_ms() for name, fn in stages.items()}
    finally:
        gc.enable()


def bench_file(path: Path, workdir: Path, repeat: int, timings: dict[str, dict[str, float]]) -> dict[str, Any]:
    ckpt = import_legacy(path)
    raw, zstd, v1 = workdir / f"{path.stem}.mfmt", workdir / f"{path.stem}.zstd.mfmt", workdir / f"{path.stem}.v1.pt"
    storable = storable_checkpoint(ckpt)
    write_raw = timeit(lambda: write_checkpoint(storable, raw), repeat, 1)
    write_checkpoint(storable, zstd, compression="zstd")
    export = timeit(lambda: export_v1(ckpt, v1), repeat, 1)
    ours, theirs = timings["import_legacy"], timings["torch.load"]
    return {
        "file": path.name,
        "shape": ckpt.provenance.get("shape"),
        "tensors": len(ckpt.tensors),
        "timings_ms": timings,
        "ratio_vs_torch_load": ours["median_ms"] / theirs["median_ms"],
        "ratio_vs_torch_load_min": ours["min_ms"] / theirs["min_ms"],
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
        v, vmin = r["ratio_vs_torch_load"], r["ratio_vs_torch_load_min"]
        ours, theirs = r["timings_ms"]["import_legacy"], r["timings_ms"]["torch.load"]
        out.append({"area": "legacy", "target": "import a v1 Metta file: import_legacy ÷ torch.load(weights_only=False)",
                    "dataset": f"{r['file']} ({r['bytes']['pt'] / 1e6:.1f} MB)", "value": v, "value_from_min": vmin,
                    "value_interleaved": v, "goal": "≤ 1.0", "met": v <= 1.0, "noisy": (v <= 1.0) != (vmin <= 1.0),
                    "detail": f"{ours['median_ms']:.1f} vs {theirs['median_ms']:.1f} ms"})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="legacy .pt files (default: the Metta fixtures)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--repeat", type=int, default=None, help="runs per timing (default 15; --quick: 5)")
    parser.add_argument("--quick", action="store_true", help="5 runs per timing")
    parser.add_argument("--baseline", metavar="DIR", help="copy of mettaformat/legacy to time against (see above)")
    parser.add_argument("--parts", action="store_true", help="time each stage of an import")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the imports")
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (5 if args.quick else 15)
    files = args.files or sorted(FIXTURES_METTA.glob("*.pt"))
    if not files:
        print(f"no fixtures in {FIXTURES_METTA}", file=sys.stderr)
        return 1
    baseline = str(Path(args.baseline).resolve()) if args.baseline else None
    timings = round_robin(files, args.repeat, baseline)
    gc.freeze()
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_file(f, Path(tmp), min(args.repeat, 5), timings[str(f)]) for f in files]
    rows = []
    for r in results:
        t, b = r["timings_ms"], r["bytes"]
        base = t.get("baseline import_legacy")
        rows.append([
            r["file"], r["shape"], r["tensors"], f"{t['import_legacy']['median_ms']:.1f}",
            f"{base['median_ms']:.1f}" if base else "-", f"{t['torch.load']['median_ms']:.1f}",
            f"{r['ratio_vs_torch_load']:.2f}" + (f" (before {base['median_ms'] / t['torch.load']['median_ms']:.2f})"
                                                 if base else ""),
            f"{r['ratio_vs_torch_load_min']:.2f}", f"{r['export_v1_ms']['median_ms']:.1f}",
            f"{b['pt'] / 1e6:.2f}", f"{b['mfmt_raw'] / b['pt']:.3f}", f"{b['mfmt_zstd'] / b['pt']:.3f}",
        ])
    print(markdown_table(
        ["file", "shape", "tensors", "import_legacy ms", "baseline ms", "torch.load ms", "ours ÷ torch (medians)",
         "(mins)", "export_v1 ms", ".pt MB", "mfmt raw / .pt", "mfmt zstd / .pt"],
        rows,
    ))
    found = legacy_targets(results)
    if found:
        print("\nTarget: importing a v1 Metta file no slower than `torch.load(weights_only=False)` with the original "
              "classes present (stand-ins here), same process, interleaved:\n")
        print(markdown_table(["file", "import_legacy ÷ torch.load (medians)", "(mins)", "result"],
                             [[t["dataset"], f"{t['value']:.2f}", f"{t['value_from_min']:.2f}",
                               ("met" if t["met"] else "**not met**") + (" (noisy)" if t["noisy"] else "")]
                              for t in found]))
    if args.parts:
        for f in files:
            print(f"\n{f.name}: stages of an import (ms)\n")
            stages = parts(f, args.repeat)
            print(markdown_table(["stage", "median", "min"],
                                 [[k, f"{v['median_ms']:.2f}", f"{v['min_ms']:.2f}"] for k, v in stages.items()]))
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for f in files:
            for _ in range(args.repeat):
                import_legacy(f)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if args.json:
        write_json(args.json, {"environment": environment(), "repeat": args.repeat, "results": results,
                               "targets": found})
    return 0


if __name__ == "__main__":
    sys.exit(main())
