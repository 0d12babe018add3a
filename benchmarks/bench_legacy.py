"""Legacy import vs ``torch.load``, and file sizes before and after migration, per Metta fixture.

Usage::

    python -m benchmarks.bench_legacy [--json OUT] [--repeat 7]

For each file in ``../shared/fixtures/metta``:

- ``import_legacy`` (our pickle VM; nothing executed) in this process;
- ``torch.load(weights_only=False)`` of the same file in a subprocess where a meta-path finder
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

    class StandIn(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            if name == "PolicyMetadata":
                cls = type(name, (dict,), {"__module__": self.__name__})
            elif name == "Any":
                cls = object
            elif self.__name__.startswith(("metta.agent", "tensordict.nn")) and name[0].isupper():
                cls = type(name, (nn.Module,), {"__module__": self.__name__})
            else:
                cls = type(name, (), {"__module__": self.__name__})
            setattr(self, name, cls)
            return cls

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("metta", "gymnasium", "omegaconf", "tensordict"):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
        def create_module(self, spec):
            return StandIn(spec.name)
        def exec_module(self, module):
            module.__path__ = []

    sys.meta_path.insert(0, Finder())
    path, repeat = sys.argv[1], int(sys.argv[2])
    torch.load(path, weights_only=False, map_location="cpu")  # warm-up (imports, page cache)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.load(path, weights_only=False, map_location="cpu")
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median": statistics.median(times), "min": min(times), "max": max(times)}))
    """
)


def torch_load_ms(path: Path, repeat: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", TORCH_LOAD, str(path), str(repeat)], capture_output=True, text=True, check=True
    )
    t = json.loads(out.stdout)
    return {k: v * 1e3 for k, v in t.items()}


def bench_file(path: Path, workdir: Path, repeat: int) -> dict[str, Any]:
    ckpt = import_legacy(path)
    ours = timeit(lambda: import_legacy(path), repeat, 1)
    theirs = torch_load_ms(path, repeat)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    files = sorted(FIXTURES_METTA.glob("*.pt"))
    if not files:
        print(f"no fixtures in {FIXTURES_METTA}", file=sys.stderr)
        return 1
    gc.freeze()
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_file(f, Path(tmp), args.repeat) for f in files]
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
    if args.json:
        write_json(args.json, {"environment": environment(), "repeat": args.repeat, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
