"""Where ``import_legacy`` spends its time, against ``torch.load`` in the same process.

Usage::

    python -m benchmarks.bench_import_vm [FILE] [--repeat 30] [--baseline DIR] [--profile]

Reports medians of wall time (``perf_counter``) and CPU time (``process_time``) for:

- ``import_legacy`` as a whole, and its parts: reading the file, zip validation (with and
  without CRC checks), the pickle VM with storage/tensor rebuilds, the shape recognisers;
- ``torch.load(weights_only=False)`` of the same file with stand-in classes supplied by a
  meta-path finder (as ``bench_legacy`` does in a subprocess; here in-process, so that both
  run under the same machine load). Only run this on trusted fixtures.

``--baseline DIR`` names a copy of the ``mettaformat/legacy`` package whose own imports were
rewritten to ``<basename of DIR>.<module>``; its ``import_legacy`` is timed interleaved with the
current one, so before/after numbers come from the same process. ``--profile`` prints a
cProfile of the current import.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib
import importlib.abc
import importlib.machinery
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._harness import FIXTURES_METTA
from mettaformat.legacy import import_legacy, torchzip
from mettaformat.legacy.metta import LoadedPickle, to_checkpoint
from mettaformat.legacy.torchzip import load_torch_zip, open_torch_zip

DEFAULT = FIXTURES_METTA / "v1_era_d_model_0050.pt"


def _install_stand_ins() -> None:

    from tests.legacy_helpers.standins import install
    install()


def _read(path: Path) -> bytearray:
    with open(path, "rb") as f:
        buf = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(buf)
    return buf


def _measure(
    fns: dict[str, Callable[[], Any]], repeat: int, *, gc_off: bool = False
) -> dict[str, tuple[float, float, float]]:
    """(median wall ms, min wall ms, median cpu ms) per function, runs interleaved round-robin.

    Garbage from the previous run is collected before each run, untimed, so that no run pays
    for another's; with ``gc_off`` the collector is also paused during the run (as
    ``import_legacy`` does itself).
    """
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(repeat):
        for name, f in fns.items():
            gc.collect()
            if gc_off:
                gc.disable()
            w, c = time.perf_counter(), time.process_time()
            result = f()
            cpus[name].append(time.process_time() - c)
            walls[name].append(time.perf_counter() - w)
            del result
            gc.enable()
    return {
        k: (statistics.median(walls[k]) * 1e3, min(walls[k]) * 1e3, statistics.median(cpus[k]) * 1e3) for k in fns
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", default=str(DEFAULT))
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--baseline", metavar="DIR", help="copy of mettaformat/legacy to compare against")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-torch-load", action="store_true")
    args = parser.parse_args(argv)
    path = Path(args.file)
    import torch

    totals: dict[str, Callable[[], Any]] = {"import_legacy": lambda: import_legacy(path)}
    if args.baseline:
        base = Path(args.baseline).resolve()
        sys.path.insert(0, str(base.parent))
        base_import = importlib.import_module(base.name).import_legacy
        totals["baseline import_legacy"] = lambda: base_import(path)
    if not args.no_torch_load:
        _install_stand_ins()
        totals["torch.load"] = lambda: torch.load(path, weights_only=False, map_location="cpu")

    buf = _read(path)
    zip_ = open_torch_zip(buf)
    value, seen = load_torch_zip(zip_)
    check_crcs = torchzip._check_crcs

    def open_no_crc() -> None:
        torchzip._check_crcs = lambda *a: None  # type: ignore[assignment]
        try:
            open_torch_zip(buf)
        finally:
            torchzip._check_crcs = check_crcs

    parts: dict[str, Callable[[], Any]] = {
        "  read file": lambda: _read(path),
        "  open_torch_zip": lambda: open_torch_zip(buf),
        "  open_torch_zip (no CRC)": open_no_crc,
        "  load_torch_zip (VM + tensors)": lambda: load_torch_zip(zip_),
        "  to_checkpoint (recognisers)": lambda: to_checkpoint(LoadedPickle(value, seen, "torch-zip", {})),
    }
    gc.freeze()
    results = _measure(totals, args.repeat)
    results.update(_measure(parts, args.repeat, gc_off=True))  # as import_legacy runs them
    print(f"{path.name}: {args.repeat} runs each, interleaved (ms)")
    print(f"{'':34} {'wall med':>9} {'wall min':>9} {'cpu med':>9}")
    for name, (wall, wall_min, cpu) in results.items():
        print(f"{name:34} {wall:9.2f} {wall_min:9.2f} {cpu:9.2f}")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.repeat):
            import_legacy(path)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
