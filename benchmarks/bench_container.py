"""Container benchmark: mettaformat (raw, zstd) against safetensors and torch.save, in one run.

Usage::

    python -m benchmarks.bench_container [--quick] [--json OUT] [--sizes 10MiB 100MiB 1GiB]
                                         [--dir /tmp] [--only SUBSTR ...] [--formats NAME ...]

For every data set and format it measures file size and compression ratio (original bytes ÷
file bytes), save time, full load, full load plus touching every byte, lazy open plus
``keys()`` (header only) and lazy open plus the first tensor. Every timing is the median of
several runs after a warm-up, with min and max; files are in page cache. Then it compares the
ratios against the targets of ``/work/shared/BENCH.md`` and writes everything to JSON.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import mettaformat
from benchmarks._harness import (
    CHILD_RSS_HELPERS,
    REPO_ROOT,
    Dataset,
    GiB,
    MiB,
    Timing,
    environment,
    fmt_ms,
    load_metta_fixture,
    load_minilm,
    markdown_table,
    peak_rss_subprocess,
    reference_bandwidths,
    synthetic,
    timeit,
    write_json,
)

StateDict = Mapping[str, torch.Tensor]


# -- touching every value -----------------------------------------------------------------------
def touch(sd: StateDict) -> int:
    """Read every byte of every tensor (an int64 sum where the bytes allow it, else uint8)."""
    total = 0
    for t in sd.values():
        if t.numel() == 0:
            continue
        b = t.reshape(-1).view(torch.uint8)
        if b.numel() % 8 == 0:
            try:
                total += int(b.view(torch.int64).sum())
                continue
            except RuntimeError:  # storage offset not a multiple of 8
                pass
        total += int(b.sum())
    return total


# -- formats --------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One way of reading a file: a full load and a lazy open."""

    name: str
    load: Callable[[Path], StateDict]
    open_keys: Callable[[Path], Any] | None
    open_first: Callable[[Path, str], torch.Tensor] | None


@dataclass
class Format:
    name: str
    save: Callable[[StateDict, Path], None]
    variants: list[Variant] = field(default_factory=list)
    kind: str = "raw"  # "raw", "zstd" or "peer"
    level: int | None = None


def _mf_variants() -> list[Variant]:
    out = []
    for verify in (True, False):
        def load(p: Path, v: bool = verify) -> StateDict:
            return mettaformat.load_file(p, verify=v)

        def keys(p: Path, v: bool = verify) -> Any:
            with mettaformat.open(p, verify=v) as f:
                return f.keys()

        def first(p: Path, name: str, v: bool = verify) -> torch.Tensor:
            with mettaformat.open(p, verify=v) as f:
                return f.get_tensor(name)

        out.append(Variant("verify" if verify else "no-verify", load, keys, first))
    return out


def _mf_format(compression: str, level: int | None) -> Format:
    if compression == "none":
        return Format("mf-raw", lambda sd, p: mettaformat.save_file(sd, p), _mf_variants(), "raw")
    return Format(f"mf-zstd-{level}", lambda sd, p, lv=level: mettaformat.save_file(sd, p, compression="zstd", level=lv),
                  _mf_variants(), "zstd", level)


def _safetensors_format() -> Format:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def keys(p: Path) -> Any:
        with safe_open(str(p), "pt") as f:
            return list(f.keys())

    def first(p: Path, name: str) -> torch.Tensor:
        with safe_open(str(p), "pt") as f:
            return f.get_tensor(name)

    return Format("safetensors", lambda sd, p: save_file(dict(sd), str(p)),
                  [Variant("load_file", lambda p: load_file(str(p)), keys, first)], "peer")


def _torch_format() -> Format:
    def load(p: Path) -> StateDict:
        return torch.load(p, weights_only=True)

    def load_mmap(p: Path) -> StateDict:
        return torch.load(p, weights_only=True, mmap=True)

    return Format("torch", lambda sd, p: torch.save(dict(sd), p), [
        Variant("plain", load, None, lambda p, n: load(p)[n]),
        Variant("mmap", load_mmap, None, lambda p, n: load_mmap(p)[n]),
    ], "peer")


def all_formats(quick: bool) -> list[Format]:
    levels = (1, 3) if quick else (1, 3, 9)
    return [_mf_format("none", None), *[_mf_format("zstd", lv) for lv in levels], _safetensors_format(),
            _torch_format()]


# -- measuring ------------------------------------------------------------------------------------
@dataclass
class Row:
    dataset: str
    format: str
    variant: str
    kind: str
    level: int | None
    original_bytes: int
    file_bytes: int
    save: Timing | None
    load: Timing | None
    load_touch: Timing | None
    open_keys: Timing | None
    open_first: Timing | None

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.file_bytes if self.file_bytes else float("nan")

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in ("dataset", "format", "variant", "kind", "level",
                                                           "original_bytes", "file_bytes")}
        d["compression_ratio"] = self.ratio
        for k in ("save", "load", "load_touch", "open_keys", "open_first"):
            t = getattr(self, k)
            d[k] = t.as_ms() if t is not None else None
        return d


def measure_dataset(ds: Dataset, formats: list[Format], workdir: Path, repeat: int, budget_s: float,
                    log: Callable[[str], None]) -> tuple[list[Row], dict[str, Any]]:
    sd = ds.tensors
    original = ds.nbytes
    first_name = next(iter(sd))
    rows: list[Row] = []
    touch_only = timeit(lambda: touch(sd), repeat, 1, budget_s=budget_s)
    extra = {"touch_in_memory": touch_only, "first_tensor": first_name,
             "first_tensor_bytes": sd[first_name].numel() * sd[first_name].element_size(),
             "loadavg_before": os.getloadavg()}
    for fmt in formats:
        path = workdir / f"bench-{ds.name}.{fmt.name}"
        try:
            t0 = time.perf_counter()
            save = timeit(lambda: fmt.save(sd, path), repeat, 1, budget_s=budget_s)
            size = path.stat().st_size
            for v in fmt.variants:
                load = timeit(lambda: v.load(path), repeat, 1, budget_s=budget_s)
                load_touch = timeit(lambda: touch(v.load(path)), repeat, 1, budget_s=budget_s)
                keys = timeit(lambda: v.open_keys(path), max(repeat, 5), 2) if v.open_keys else None
                first = (timeit(lambda: v.open_first(path, first_name), max(repeat, 5), 2, budget_s=max(budget_s, 1.0))
                         if v.open_first else None)
                rows.append(Row(ds.name, fmt.name, v.name, fmt.kind, fmt.level, original, size, save, load,
                                load_touch, keys, first))
            log(f"  {ds.name} {fmt.name}: {time.perf_counter() - t0:.1f}s")
        finally:
            path.unlink(missing_ok=True)
            gc.collect()
    extra["loadavg_after"] = os.getloadavg()
    return rows, extra


def table(rows: list[Row], touch_only: Timing) -> str:
    headers = ["format", "read", "file MB", "ratio", "save ms", "load ms", "load+touch ms", "open+keys ms",
               "open+first ms", "load GB/s", "load+touch GB/s"]
    out = []
    for r in rows:
        gbps = (lambda t: r.original_bytes / t.median / 1e9 if t else None)
        out.append([r.format, r.variant, f"{r.file_bytes / 1e6:.2f}", f"{r.ratio:.3f}", fmt_ms(r.save),
                    fmt_ms(r.load), fmt_ms(r.load_touch), fmt_ms(r.open_keys), fmt_ms(r.open_first),
                    gbps(r.load), gbps(r.load_touch)])
    return (markdown_table(headers, out)
            + f"\n\nTimes: median (min–max) in ms. Touching the same tensors already in RAM costs {fmt_ms(touch_only)} ms."
            " GB/s = original bytes ÷ median time.")


# -- targets ------------------------------------------------------------------------------------
def _find(rows: list[Row], dataset: str, fmt: str, variant: str | None = None) -> Row | None:
    for r in rows:
        if r.dataset == dataset and r.format == fmt and (variant is None or r.variant == variant):
            return r
    return None


def targets(rows: list[Row], datasets: list[str], default_level: int = 3) -> list[dict[str, Any]]:
    """Each BENCH.md target as a ratio measured in this run, per data set, marked met or not."""
    out: list[dict[str, Any]] = []

    def add(target: str, dataset: str, value: float | None, goal: str, met: bool | None, detail: str,
            value_min: float | None = None, met_min: bool | None = None) -> None:
        """``value`` from medians decides; ``value_min`` (from the fastest runs) flags noise."""
        out.append({"target": target, "dataset": dataset, "value": value, "goal": goal,
                    "met": None if value is None else met, "detail": detail, "value_from_min": value_min,
                    "met_from_min": met_min, "noisy": met_min is not None and met_min != met})

    for ds in datasets:
        st = _find(rows, ds, "safetensors")
        for variant in ("verify", "no-verify"):
            raw = _find(rows, ds, "mf-raw", variant)
            if st and raw:
                if raw.open_first and st.open_first:
                    v = raw.open_first.median / st.open_first.median
                    m = raw.open_first.min / st.open_first.min
                    add(f"lazy open + first tensor, mf raw ({variant}) ÷ safetensors safe_open+get_tensor", ds, v,
                        "≤ 1.0", v <= 1.0, f"{raw.open_first.median * 1e3:.3f} ms vs {st.open_first.median * 1e3:.3f} ms",
                        m, m <= 1.0)
                if raw.load_touch and st.load_touch:
                    v = raw.load_touch.median / st.load_touch.median
                    m = raw.load_touch.min / st.load_touch.min
                    add(f"full load + touch, mf raw ({variant}) ÷ safetensors load_file + touch", ds, v, "≤ 1.1",
                        v <= 1.1, f"{raw.load_touch.median * 1e3:.2f} ms vs {st.load_touch.median * 1e3:.2f} ms",
                        m, m <= 1.1)
        raw = _find(rows, ds, "mf-raw")
        if st and raw and raw.save and st.save:
            v = raw.save.median / st.save.median
            m = raw.save.min / st.save.min
            add("save, mf raw ÷ safetensors save_file", ds, v, "≤ 1.0", v <= 1.0,
                f"{raw.save.median * 1e3:.2f} ms vs {st.save.median * 1e3:.2f} ms", m, m <= 1.0)
        z = f"mf-zstd-{default_level}"
        for variant in ("verify", "no-verify"):
            zr = _find(rows, ds, z, variant)
            if zr and zr.load:
                v = zr.original_bytes / zr.load.median / 1e9
                m = zr.original_bytes / zr.load.min / 1e9
                add(f"zstd-{default_level} decode (load_file, {variant}, 2 threads)", ds, v, "≥ 1.5 GB/s", v >= 1.5,
                    f"{zr.original_bytes / 1e6:.1f} MB in {zr.load.median * 1e3:.1f} ms", m, m >= 1.5)
        zr = _find(rows, ds, z)
        if zr and zr.save:
            v = zr.original_bytes / zr.save.median / 1e6
            m = zr.original_bytes / zr.save.min / 1e6
            add(f"zstd encode at the default level ({default_level})", ds, v, "≥ 400 MB/s", v >= 400,
                f"{zr.original_bytes / 1e6:.1f} MB in {zr.save.median * 1e3:.1f} ms", m, m >= 400)
        goal = {"minilm-fp32": 1.22, "minilm-bf16": 1.50}.get(ds)
        if goal is not None:
            best = max((r for r in rows if r.dataset == ds and r.kind == "zstd"), key=lambda r: r.ratio, default=None)
            if zr:
                add(f"compression ratio at the default level ({default_level})", ds, zr.ratio, f"≥ {goal}",
                    zr.ratio >= goal, f"{zr.file_bytes} bytes; best level here: "
                    + (f"{best.format} {best.ratio:.3f}" if best else "—"))
    return out


def targets_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for t in results:
        met = {True: "met", False: "**not met**", None: "n/a"}[t["met"]]
        if t["noisy"]:
            met += " (noisy: the min-based ratio disagrees)"
        value, vmin = t["value"], t["value_from_min"]
        rows.append([t["target"], t["dataset"], f"{value:.3f}" if isinstance(value, float) else value,
                     f"{vmin:.3f}" if isinstance(vmin, float) else "—", t["goal"], met, t["detail"]])
    return markdown_table(["target", "dataset", "value (medians)", "value (mins)", "goal", "result (medians)",
                           "detail (medians)"], rows)


# -- peak RSS (full run only) -------------------------------------------------------------------
_RSS_PRELUDE = """
import sys, torch, mettaformat
sys.path.insert(0, {root!r})
from benchmarks._harness import synthetic
from benchmarks.bench_container import touch
""" + CHILD_RSS_HELPERS


def peak_rss(workdir: Path, size: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Peak RSS of a child that saves, and of one that loads and touches, a synthetic state dict.

    ``baseline`` is the child's peak just before the measured step (the generated tensors for a
    save; the imports for a load). Pages of a mapped file that are touched count toward RSS too.
    """
    saves = {
        "mf-raw": "mettaformat.save_file(sd, p)",
        "mf-zstd-3": "mettaformat.save_file(sd, p, compression='zstd', level=3)",
        "safetensors": "from safetensors.torch import save_file; save_file(sd, str(p))",
        "torch": "torch.save(sd, p)",
    }
    loads = {
        "mf-raw": "sd = mettaformat.load_file(p)",
        "mf-zstd-3": "sd = mettaformat.load_file(p)",
        "safetensors": "from safetensors.torch import load_file; sd = load_file(str(p))",
        "torch": "sd = torch.load(p, weights_only=True)",
        "torch-mmap": "sd = torch.load(p, weights_only=True, mmap=True)",
    }
    out = []
    prelude = _RSS_PRELUDE.format(root=str(REPO_ROOT))
    for name, save in saves.items():
        path = workdir / f"rss.{name}"
        code = prelude + f"""
sd = synthetic({size}).tensors
p = {str(path)!r}
base = rss()
reset_peak()
{save}
print(base, peak())
"""
        r = peak_rss_subprocess(code)
        base, peak = map(int, r["output"].split()[-2:]) if r["returncode"] == 0 else (0, 0)
        out.append({"op": "save", "format": name, "baseline_bytes": base, "peak_bytes": peak,
                    "extra_bytes": peak - base, "returncode": r["returncode"]})
        for lname, load in loads.items():
            if not lname.startswith(name):
                continue
            code = prelude + f"""
p = {str(path)!r}
base = rss()
reset_peak()
{load}
touch(sd)
print(base, peak())
"""
            r = peak_rss_subprocess(code)
            base, peak = map(int, r["output"].split()[-2:]) if r["returncode"] == 0 else (0, 0)
            out.append({"op": "load+touch", "format": lname, "baseline_bytes": base, "peak_bytes": peak,
                        "extra_bytes": peak - base, "returncode": r["returncode"]})
        path.unlink(missing_ok=True)
        log(f"  peak RSS {name} done")
    return out


# -- main -----------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    units = {"GIB": GiB, "MIB": MiB, "GB": 10**9, "MB": 10**6, "G": GiB, "M": MiB}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 MiB and 100 MiB only, zstd 1 and 3, fewer repeats")
    ap.add_argument("--json", type=Path, default=None, help="write results here (default bench-out/container[-quick].json)")
    ap.add_argument("--sizes", nargs="+", default=None, help="synthetic sizes, e.g. 10MiB 100MiB 1GiB")
    ap.add_argument("--dir", type=Path, default=Path("/tmp"), help="where files are written (default /tmp)")
    ap.add_argument("--only", nargs="+", default=None, help="only data sets whose name contains one of these")
    ap.add_argument("--formats", nargs="+", default=None, help="only these formats (e.g. mf-raw safetensors)")
    ap.add_argument("--repeat", type=int, default=None, help="measured runs per timing")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS children (full run only)")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    workdir = Path(args.dir) / f"mettaformat-bench-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [parse_size(s) for s in args.sizes] if args.sizes else (
        [10 * MiB, 100 * MiB] if args.quick else [10 * MiB, 100 * MiB, GiB])
    # --quick: 3 runs, and slow timings (zstd saves/loads) cut to 2 runs after the warm-up,
    # so that it stays around a minute on an idle 2-core machine (about twice that under load).
    repeat = args.repeat or (3 if args.quick else 7)
    budget = 0.4 if args.quick else 6.0

    env = environment(workdir)
    print(f"# mettaformat container benchmark{' (--quick)' if args.quick else ''}\n")
    print(f"{env['cpu_model']}, {env['cpu_count']} cores, {env['platform']}; python {env['python']}, torch "
          f"{env['torch']} ({env['torch_threads']} threads), safetensors {env['safetensors']}, zstandard "
          f"{env['zstandard']} (libzstd {env['libzstd']}), msgpack {env['msgpack']}.")
    print(f"Files in {workdir} on {env['workdir_fs']}: page cache, warm. Load average at start: "
          f"{', '.join(f'{x:.2f}' for x in env['loadavg_at_start'])}.\n")

    ref = reference_bandwidths(workdir)
    print(f"Reference (256 MiB, this run): memcpy into a preallocated buffer {ref['memcpy_numpy_1thread_gbps']:.2f} "
          f"GB/s (numpy, 1 thread), {ref['memcpy_torch_copy_gbps']:.2f} GB/s (torch copy_); readinto from page "
          f"cache {ref['readinto_page_cache_gbps']:.2f} GB/s; read_bytes (allocating) "
          f"{ref['read_bytes_allocating_gbps']:.2f} GB/s.\n")

    datasets: list[Dataset] = []
    skipped: dict[str, str] = {}
    minilm, reason = load_minilm()
    if reason:
        skipped["minilm"] = reason
    datasets += minilm
    metta, reason = load_metta_fixture()
    if reason:
        skipped["metta"] = reason
    datasets += metta
    datasets += [synthetic(s) for s in sizes]
    if args.only:
        datasets = [d for d in datasets if any(o in d.name for o in args.only)]
    for name, why in skipped.items():
        print(f"Skipped data set {name}: {why}.")
    if skipped:
        print()

    gc.collect()
    gc.freeze()  # long-lived objects out of the collector: per-run gc.collect() costs µs, not 0.1 s
    formats = all_formats(args.quick)
    if args.formats:
        formats = [f for f in formats if f.name in args.formats]
    all_rows: list[Row] = []
    per_dataset: dict[str, Any] = {}
    for ds in datasets:
        big = ds.nbytes >= 512 * MiB
        rep = min(repeat, 3) if big else repeat
        t0 = time.perf_counter()
        rows, extra = measure_dataset(ds, formats, workdir, rep, budget * (2 if big else 1), log)
        all_rows += rows
        per_dataset[ds.name] = {**ds.describe(), **extra, "repeat": rep, "seconds": time.perf_counter() - t0}
        print(f"## {ds.name}: {len(ds.tensors)} tensors, {ds.nbytes / 1e6:.1f} MB ({ds.note}); first tensor "
              f"{extra['first_tensor']!r} ({extra['first_tensor_bytes']} bytes); {rep} runs after 1 warm-up "
              f"(fewer where marked in JSON); load average {extra['loadavg_before'][0]:.2f} → "
              f"{extra['loadavg_after'][0]:.2f}\n")
        print(table(rows, extra["touch_in_memory"]))
        print(flush=True)
        if big:
            ds.tensors.clear()
            gc.collect()

    results = targets(all_rows, list(per_dataset))
    print("## Targets (BENCH.md), ratios measured in this run\n")
    print(targets_table(results))
    print("\nNot measured: 'copying load into fresh memory ≥ 70% of readinto' (the library has no copying raw "
          "load), checkpoint selection and legacy import (other benchmarks).\n")

    rss: list[dict[str, Any]] = []
    if not args.quick and not args.no_rss:
        rss = peak_rss(workdir, 100 * MiB, log)
        print("## Peak RSS, 100 MiB synthetic, fresh child per operation\n")
        print(markdown_table(["op", "format", "baseline MB", "peak MB", "extra MB"],
                             [[r["op"], r["format"], f"{r['baseline_bytes'] / 1e6:.0f}",
                               f"{r['peak_bytes'] / 1e6:.0f}", f"{r['extra_bytes'] / 1e6:.0f}"] for r in rss]))
        print("\nbaseline = the child's RSS just before the step (the generated tensors for save, the imports "
              "for load); peak = VmHWM during the step (reset through /proc/self/clear_refs). Touched pages of a "
              "mapped file count toward RSS, so a mapped load+touch shows the file size as extra.\n")

    try:
        workdir.rmdir()
    except OSError:
        pass
    elapsed = time.perf_counter() - started
    out = args.json or REPO_ROOT / "bench-out" / f"container{'-quick' if args.quick else ''}.json"
    write_json(out, {"environment": env, "reference": ref, "quick": args.quick, "repeat": repeat,
                     "skipped": skipped, "datasets": per_dataset, "rows": [r.as_dict() for r in all_rows],
                     "targets": results, "peak_rss": rss, "elapsed_s": elapsed})
    print(f"Total {elapsed:.0f} s. JSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
