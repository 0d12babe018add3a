"""Loading onto a GPU: mettaformat's pipelined loader against the peers, as GB/s and as a share of
the measured pinned host-to-device bandwidth.

Usage::

    python -m benchmarks.bench_gpu [--quick] [--json OUT] [--dir /tmp] [--sizes 1GiB 8GiB] [--device cuda:0]

Without a CUDA device it prints why it measured nothing and exits 0.

For each size (default 1 GiB and 8 GiB; ``--quick`` 256 MiB), files in page cache:

- pinned host-to-device bandwidth: ``copy_`` of a pinned buffer of the same size (the ceiling);
- ``mettaformat.load_file(device=...)`` raw (verify on and off) and zstd level 1;
- ``safetensors.torch.load_file(device=...)`` and ``safe_open(..., device=...)`` tensor by tensor;
- ``torch.load(map_location=device, mmap=True)`` of a ``torch.save`` file;
- ``fastsafetensors`` where it imports.

Each timing ends with ``torch.cuda.synchronize()``; medians of ``--repeat`` runs after a warm-up.
The peak host memory of a mettaformat load is measured in a fresh child process (``VmHWM``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks._harness import CHILD_RSS_HELPERS, REPO_ROOT, GiB, MiB, markdown_table, synthetic, timeit, write_json

SKIP_MESSAGE = "GPU benchmark skipped: no CUDA device is available (torch.cuda.is_available() is False)."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    units = {"GiB": GiB, "MiB": MiB}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def pinned_h2d(size: int, device: torch.device, repeat: int) -> float:
    """Seconds for one pinned host-to-device copy of ``size`` bytes (median)."""
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(size, dtype=torch.uint8, device=device)

    def copy() -> None:
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)

    return timeit(copy, repeat, 1).median


def _synced(fn: Any, device: torch.device) -> Any:
    def run() -> Any:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def peers(path_st: Path, path_pt: Path, device: torch.device) -> dict[str, Any]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    def st_open() -> dict[str, torch.Tensor]:
        with safe_open(path_st, "pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    fns: dict[str, Any] = {
        "safetensors load_file": lambda: load_file(path_st, device=str(device)),
        "safetensors safe_open": st_open,
        "torch.load(mmap=True)": lambda: torch.load(path_pt, map_location=device, mmap=True, weights_only=True),
    }
    try:
        import fastsafetensors  # noqa: F401

        fns["fastsafetensors"] = lambda: _fastsafetensors(path_st, device)
    except ImportError:
        log("fastsafetensors is not installed: its row is skipped")
    return fns


def _fastsafetensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    loader = SafeTensorsFileLoader(SingleGroup(), device=str(device), nogds=True)
    loader.add_filenames({0: [str(path)]})
    buffers = loader.copy_files_to_device()
    try:
        return {k: buffers.get_tensor(k).clone() for k in buffers.key_to_rank_lidx}
    finally:
        buffers.close()
        loader.close()


def host_peak(path: Path, device: torch.device) -> dict[str, int]:
    """Peak RSS above the starting RSS of a fresh process loading ``path`` onto ``device``."""
    code = CHILD_RSS_HELPERS + (
        "import json, sys, torch, mettaformat\n"
        f"torch.zeros(1, device={str(device)!r}); torch.empty(1, pin_memory=True)\n"
        "reset_peak(); base = rss()\n"
        f"sd = mettaformat.load_file({str(path)!r}, device={str(device)!r}); torch.cuda.synchronize()\n"
        "print(json.dumps({'base': base, 'peak': peak(), 'above': peak() - base}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(size: int, workdir: Path, device: torch.device, repeat: int) -> dict[str, Any]:
    from safetensors.torch import save_file

    import mettaformat

    sd = synthetic(size, 200).tensors
    files = {"raw": workdir / "gpu.mfmt", "zstd": workdir / "gpu.zstd.mfmt"}
    mettaformat.save_file(sd, files["raw"])
    mettaformat.save_file(sd, files["zstd"], compression="zstd", level=1)
    path_st, path_pt = workdir / "gpu.safetensors", workdir / "gpu.pt"
    save_file(sd, path_st)
    torch.save(sd, path_pt)
    del sd
    ceiling = pinned_h2d(size, device, repeat)
    fns: dict[str, Any] = {
        "mettaformat raw": lambda: mettaformat.load_file(files["raw"], device=device),
        "mettaformat raw, verify=False": lambda: mettaformat.load_file(files["raw"], device=device, verify=False),
        "mettaformat zstd-1": lambda: mettaformat.load_file(files["zstd"], device=device),
        **peers(path_st, path_pt, device),
    }
    from mettaformat.container.verify import forget_verified

    rows = {}
    for name, fn in fns.items():
        log(f"  {name} ...")
        t = timeit(_synced(fn, device), repeat, 1, setup=forget_verified)
        rows[name] = {"median_s": t.median, "min_s": t.min, "gbps": size / t.median / 1e9,
                      "share_of_h2d": ceiling / t.median}
    result = {"bytes": size, "pinned_h2d_gbps": size / ceiling / 1e9, "rows": rows,
              "host_peak_raw": host_peak(files["raw"], device)}
    for p in (*files.values(), path_st, path_pt):
        p.unlink(missing_ok=True)
    return result


def report(doc: dict[str, Any]) -> str:
    if doc.get("skipped"):
        return f"# Loading onto a GPU\n\n{doc['skipped']}"
    lines = [f"# Loading onto a GPU ({doc['device_name']})", ""]
    for r in doc["results"]:
        peak = r["host_peak_raw"]
        lines += [f"## {r['bytes'] / GiB:.2f} GiB: pinned host-to-device {r['pinned_h2d_gbps']:.1f} GB/s; host peak "
                  f"of a raw mettaformat load {peak['above'] / MiB:.0f} MiB above its start", ""]
        lines.append(markdown_table(["loader", "ms", "GB/s", "share of pinned H2D"],
                                    [[k, f"{v['median_s'] * 1e3:.0f}", f"{v['gbps']:.1f}", f"{v['share_of_h2d']:.0%}"]
                                     for k, v in r["rows"].items()]))
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 MiB only, 3 runs")
    ap.add_argument("--json", default=None, help="also write the results as JSON")
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--sizes", nargs="*", default=None, help="default 1GiB 8GiB (--quick: 256MiB)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeat", type=int, default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        doc: dict[str, Any] = {"skipped": SKIP_MESSAGE, "targets": []}
        log(SKIP_MESSAGE)
    else:
        device = torch.device(args.device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        sizes = [parse_size(s) for s in (args.sizes or (["256MiB"] if args.quick else ["1GiB", "8GiB"]))]
        repeat = args.repeat or (3 if args.quick else 5)
        workdir = args.dir / "mf-gpu"
        workdir.mkdir(parents=True, exist_ok=True)
        doc = {"device_name": torch.cuda.get_device_name(device), "device": str(device), "results": [],
               "cpu_count": os.cpu_count()}
        for size in sizes:
            log(f"{size / GiB:.2f} GiB ...")
            doc["results"].append(measure(size, workdir, device, repeat))
        doc["targets"] = [
            {"area": "gpu", "target": "raw load to the GPU ÷ pinned H2D bandwidth", "dataset": f"{r['bytes'] >> 20} MiB",
             "value": r["rows"]["mettaformat raw"]["share_of_h2d"], "value_from_min": None, "value_interleaved": None,
             "goal": "≥ 0.8", "met": r["rows"]["mettaformat raw"]["share_of_h2d"] >= 0.8, "noisy": False,
             "detail": f"{r['rows']['mettaformat raw']['gbps']:.1f} GB/s"} for r in doc["results"]]
    print(report(doc))
    if args.json:
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
