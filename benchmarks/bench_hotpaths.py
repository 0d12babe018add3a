"""The hot paths against their peers, every row a ratio of two timings taken in this run.

Usage::

    python -m benchmarks.bench_hotpaths [--quick] [--json OUT] [--dir /tmp] [--repeat N]

Rows (``--quick``: smaller sizes, fewer repeats, a few minutes on 2 cores):

- lazy open + one tensor against ``safetensors.safe_open``, 27 / 256 / 2,048 tensors;
- full load + touching every byte, ``verify=True`` against ``verify=False`` (raw, 256 MiB and
  1 GiB), zero-copy (``mmap=True``: hash, then the touch) and copying (``mmap=False``: hash fused
  with the read); and a second verified load of the unchanged file (the memo of verified files);
- raw save against ``safetensors.torch.save_file`` (512 MiB and 1 GiB), ``durable=False`` and True;
- legacy v1 import against ``torch.load(weights_only=False)`` with the classes present (the Metta
  fixtures; skipped where they are absent);
- ``PolicyStore`` top 5 of 1,000 checkpoints, cold (no index, no memo);
- hashing: xxh3 on one and two threads against memcpy, and whether the binding holds the GIL;
- growth tables: 27 to 16,384 tensors, and 10 MiB to 1 GiB.

The two sides of a ratio run interleaved (A B A B ...) so that load from other processes on a
shared machine hits both alike; each cell is a median with the min. Files are in page cache.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import xxhash

import mettaformat
from benchmarks._harness import FIXTURES_METTA, MiB, environment, markdown_table, synthetic, write_json
from benchmarks.bench_container import touch

try:
    from mettaformat.container.verify import forget_verified
except ImportError:  # measuring a version from before the memo of verified files

    def forget_verified() -> None:
        pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int,
                setup: Callable[[], Any] | None = None) -> dict[str, dict[str, float]]:
    """Median and min seconds of each function, run in turn ``rounds`` times after one warm-up."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(rounds + 1):
        for name, fn in fns.items():
            if setup is not None:
                setup()
            gc.collect()
            t0 = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - t0
            del result
            if i:
                times[name].append(elapsed)
    return {k: {"median": statistics.median(v), "min": min(v)} for k, v in times.items()}


def ratio_row(what: str, case: str, t: dict[str, dict[str, float]], ours: str, theirs: str, goal: float
              ) -> dict[str, Any]:
    value = t[ours]["median"] / t[theirs]["median"]
    return {"measure": what, "case": case, "ours_ms": t[ours]["median"] * 1e3, "theirs_ms": t[theirs]["median"] * 1e3,
            "ratio": value, "ratio_from_min": t[ours]["min"] / t[theirs]["min"], "goal": f"≤ {goal}",
            "met": value <= goal}


def many_tensors(count: int, elements: int = 256) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(count)
    return {f"layers.{i}.weight": torch.randn(elements, generator=g) for i in range(count)}


# -- rows ---------------------------------------------------------------------------------------
def lazy_open_rows(workdir: Path, counts: list[int], rounds: int) -> list[dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import save_file

    rows = []
    for count in counts:
        sd = many_tensors(count)
        ours, theirs = workdir / f"lazy{count}.mfmt", workdir / f"lazy{count}.safetensors"
        mettaformat.save_file(sd, ours)
        save_file(sd, theirs)
        first = next(iter(sd))

        def mf(path: Path = ours, name: str = first) -> torch.Tensor:
            with mettaformat.open(path) as f:
                return f.get_tensor(name)

        def st(path: Path = theirs, name: str = first) -> torch.Tensor:
            with safe_open(path, "pt") as f:
                return f.get_tensor(name)

        t = interleaved({"mettaformat": mf, "safe_open": st}, rounds * 10)
        rows.append(ratio_row("lazy open + one tensor ÷ safe_open", f"{count} tensors", t, "mettaformat",
                              "safe_open", 1.0))
    return rows


def verify_rows(workdir: Path, sizes: list[int], rounds: int) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        ds = synthetic(size, 200)
        path = workdir / f"verify-{size >> 20}.mfmt"
        mettaformat.save_file(ds.tensors, path)
        old = time.time() - 3600
        os.utime(path, (old, old))  # an old file, as a checkpoint loaded for evaluation would be
        for mmap, label in ((True, "zero-copy (mmap=True): hash, then the touch"),
                            (False, "copying (mmap=False): hash fused with the read")):
            t = interleaved({
                "verify": lambda m=mmap: touch(mettaformat.load_file(path, mmap=m, verify=True)),
                "no verify": lambda m=mmap: touch(mettaformat.load_file(path, mmap=m, verify=False)),
            }, rounds, setup=forget_verified)
            goal = 1.5 if mmap else 1.1
            rows.append(ratio_row(f"full load + touch, verify=True ÷ verify=False, {label}",
                                  f"raw {size >> 20} MiB", t, "verify", "no verify", goal))
        mettaformat.load_file(path)  # verified once: the memo remembers it
        t = interleaved({"again": lambda: touch(mettaformat.load_file(path, verify=True)),
                         "no verify": lambda: touch(mettaformat.load_file(path, verify=False))}, rounds)
        rows.append(ratio_row("load + touch of a file verified before in this process ÷ verify=False",
                              f"raw {size >> 20} MiB", t, "again", "no verify", 1.1))
        path.unlink()
        forget_verified()
    return rows


def save_rows(workdir: Path, sizes: list[int], rounds: int) -> list[dict[str, Any]]:
    from safetensors.torch import save_file

    rows = []
    for size in sizes:
        sd = synthetic(size, 200).tensors
        ours, theirs = workdir / "save.mfmt", workdir / "save.safetensors"
        t = interleaved({"durable=False": lambda: mettaformat.save_file(sd, ours),
                         "durable=True": lambda: mettaformat.save_file(sd, ours, durable=True),
                         "save_file": lambda: save_file(sd, theirs)}, rounds)
        rows.append(ratio_row("raw save ÷ safetensors save_file, durable=False", f"{size >> 20} MiB", t,
                              "durable=False", "save_file", 1.0))
        row = ratio_row("raw save ÷ safetensors save_file, durable=True (file + directory fsync)", f"{size >> 20} MiB",
                        t, "durable=True", "save_file", 1.0)
        row["goal"], row["met"] = "(information)", None
        rows.append(row)
        ours.unlink(missing_ok=True)
        theirs.unlink(missing_ok=True)
    return rows


def legacy_rows(rounds: int) -> list[dict[str, Any]]:
    from benchmarks.bench_legacy import round_robin

    fixtures = sorted(FIXTURES_METTA.glob("v1_*.pt")) if FIXTURES_METTA.is_dir() else []
    if not fixtures:
        log(f"legacy rows skipped: no Metta fixtures at {FIXTURES_METTA}")
        return []
    timings = round_robin(fixtures, rounds, None)  # both sides interleaved in one child process
    rows = []
    for path in fixtures:
        mine, other = timings[str(path)]["import_legacy"], timings[str(path)]["torch.load"]
        value = mine["median_ms"] / other["median_ms"]
        rows.append({"measure": "legacy v1 import ÷ torch.load(weights_only=False), classes present",
                     "case": path.name, "ours_ms": mine["median_ms"], "theirs_ms": other["median_ms"],
                     "ratio": value, "ratio_from_min": mine["min_ms"] / other["min_ms"], "goal": "≤ 1.0",
                     "met": value <= 1.0})
    return rows


def store_rows(workdir: Path, count: int, rounds: int) -> list[dict[str, Any]]:
    from benchmarks.bench_store import generate, select_top5
    from mettaformat.store import PolicyStore

    directory = workdir / f"hotpaths-store-{count}"
    if not directory.is_dir() or len(list(directory.glob("*.mfmt"))) != count:
        generate(directory, count, small=False)
    for leftover in directory.glob(".mettaformat-index*"):
        leftover.unlink()
    t = interleaved({"cold": lambda: select_top5(PolicyStore(directory, use_index=False))}, rounds)
    cold = t["cold"]
    return [{"measure": f"PolicyStore top 5 of {count:,}, cold (no index, no memo)", "case": f"{count} files",
             "ours_ms": cold["median"] * 1e3, "theirs_ms": None, "ratio": None,
             "ratio_from_min": None, "goal": "< 250 ms" if count == 1000 else "(information)",
             "met": cold["median"] < 0.25 if count == 1000 else None}]


def hashing(size: int, rounds: int) -> dict[str, Any]:
    """xxh3 bandwidth on 1 and 2 threads against memcpy, and whether another thread runs meanwhile."""
    data = torch.randint(0, 255, (size,), dtype=torch.uint8)
    view = memoryview(data.numpy())
    dst = torch.empty_like(data)
    halves = [view[: size // 2], view[size // 2 :]]

    def two() -> None:
        other = threading.Thread(target=xxhash.xxh3_64_intdigest, args=(halves[1],))
        other.start()
        xxhash.xxh3_64_intdigest(halves[0])
        other.join()

    t = interleaved({"1 thread": lambda: xxhash.xxh3_64_intdigest(view), "2 threads": two,
                     "memcpy": lambda: dst.copy_(data)}, rounds)
    gbps = {k: size / v["min"] / 1e9 for k, v in t.items()}
    # GIL probe: does a thread that sleeps 0.5 ms in a loop get to run while the main thread hashes?
    # (it needs the GIL after every sleep; a binding that held it would let it run at most once)
    ticks = [0]
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            time.sleep(0.0005)
            ticks[0] += 1

    th = threading.Thread(target=ticker)
    th.start()
    time.sleep(0.02)
    before = ticks[0]
    t0 = time.perf_counter()
    xxhash.xxh3_64_intdigest(view)
    call = time.perf_counter() - t0
    during = ticks[0] - before
    stop.set()
    th.join()
    return {"bytes": size, "gbps": gbps, "hash_call_ms": call * 1e3, "other_thread_ticks_during_hash": during,
            "gil_released": during >= 3, "xxhash": xxhash.VERSION}


def growth_tensors(workdir: Path, counts: list[int], rounds: int) -> list[dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = []
    for count in counts:
        sd = many_tensors(count)
        ours, theirs = workdir / "grow.mfmt", workdir / "grow.safetensors"
        first = next(iter(sd))

        def mf_open() -> torch.Tensor:
            with mettaformat.open(ours) as f:
                return f.get_tensor(first)

        def st_open() -> torch.Tensor:
            with safe_open(theirs, "pt") as f:
                return f.get_tensor(first)

        saves = interleaved({"ours": lambda: mettaformat.save_file(sd, ours), "theirs": lambda: save_file(sd, theirs)},
                            rounds)
        opens = interleaved({"ours": mf_open, "theirs": st_open}, rounds * 3)
        loads = interleaved({"ours": lambda: mettaformat.load_file(ours), "theirs": lambda: load_file(theirs)}, rounds)
        out.append({"tensors": count, "save": saves, "open_one": opens, "load": loads})
    return out


def growth_sizes(workdir: Path, sizes: list[int], rounds: int) -> list[dict[str, Any]]:
    from safetensors.torch import load_file, save_file

    out = []
    for size in sizes:
        sd = synthetic(size, 200).tensors
        ours, theirs = workdir / "grow.mfmt", workdir / "grow.safetensors"
        saves = interleaved({"ours": lambda: mettaformat.save_file(sd, ours), "theirs": lambda: save_file(sd, theirs)},
                            rounds)
        loads = interleaved({"ours": lambda: touch(mettaformat.load_file(ours)),
                             "ours no verify": lambda: touch(mettaformat.load_file(ours, verify=False)),
                             "theirs": lambda: touch(load_file(theirs))}, rounds, setup=forget_verified)
        out.append({"bytes": size, "save": saves, "load_touch": loads})
        ours.unlink(missing_ok=True)
        theirs.unlink(missing_ok=True)
    return out


# -- report -------------------------------------------------------------------------------------
def _ms(t: dict[str, float]) -> str:
    return f"{t['median'] * 1e3:.1f} (min {t['min'] * 1e3:.1f})"


def report(doc: dict[str, Any]) -> str:
    lines = ["# Hot paths against their peers", ""]
    lines.append(markdown_table(
        ["measure", "case", "ours ms", "peer ms", "ratio (median)", "ratio (min)", "goal", "met"],
        [[r["measure"], r["case"], f"{r['ours_ms']:.1f}",
          "" if r["theirs_ms"] is None else f"{r['theirs_ms']:.1f}",
          "" if r["ratio"] is None else f"{r['ratio']:.2f}",
          "" if r["ratio_from_min"] is None else f"{r['ratio_from_min']:.2f}", r["goal"],
          {True: "yes", False: "no", None: ""}[r["met"]]] for r in doc["rows"]]))
    h = doc.get("hashing")
    lines += [] if h is None else ["", f"Hashing {h['bytes'] >> 20} MiB (xxhash {h['xxhash']}): one thread {h['gbps']['1 thread']:.1f} GB/s, "
              f"two threads {h['gbps']['2 threads']:.1f} GB/s, memcpy {h['gbps']['memcpy']:.1f} GB/s. While one "
              f"{h['hash_call_ms']:.0f} ms hash ran, a thread sleeping 0.5 ms at a time ran "
              f"{h['other_thread_ticks_during_hash']} times: the binding {'releases' if h['gil_released'] else 'holds'} the GIL, so what limits two "
              "threads is memory bandwidth (and the other processes on the machine), not the interpreter."]
    if "growth_tensors" in doc:
        lines += ["", "## Growth with the number of tensors (ms, median (min); peer: safetensors)", ""]
        lines.append(markdown_table(
            ["tensors", "save", "save_file", "open + one tensor", "safe_open + one", "load_file", "safetensors load_file"],
            [[g["tensors"], _ms(g["save"]["ours"]), _ms(g["save"]["theirs"]), _ms(g["open_one"]["ours"]),
              _ms(g["open_one"]["theirs"]), _ms(g["load"]["ours"]), _ms(g["load"]["theirs"])]
             for g in doc["growth_tensors"]]))
        lines += ["", "## Growth with size (ms, median (min); 200 fp32 tensors; load + touch every byte)", ""]
        lines.append(markdown_table(
            ["size", "save", "save_file", "load+touch verify", "load+touch no verify", "safetensors load+touch"],
            [[f"{g['bytes'] >> 20} MiB", _ms(g["save"]["ours"]), _ms(g["save"]["theirs"]), _ms(g["load_touch"]["ours"]),
              _ms(g["load_touch"]["ours no verify"]), _ms(g["load_touch"]["theirs"])] for g in doc["growth_sizes"]]))
    lines += ["", f"Load average {doc['loadavg_start']} at the start, {doc['loadavg_end']} at the end "
              "(other processes share these cores; the ratios are what carries over)."]
    return "\n".join(lines)


PARTS = ("lazy", "verify", "save", "legacy", "store", "hashing", "growth")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_hotpaths", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--json", default=None, help="also write the results as JSON")
    ap.add_argument("--dir", type=Path, default=Path("/tmp"), help="where the files are written")
    ap.add_argument("--repeat", type=int, default=None, help="rounds per row (default 5; --quick 3)")
    ap.add_argument("--rows", default=",".join(PARTS),
                    help=f"comma-separated parts to measure (default all: {','.join(PARTS)})")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rounds = args.repeat or (3 if args.quick else 5)
    workdir = args.dir / "mf-hotpaths"
    workdir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"environment": environment(workdir), "quick": args.quick, "loadavg_start": os.getloadavg()}
    parts = {p.strip() for p in args.rows.split(",")}
    rows: list[dict[str, Any]] = []
    if "lazy" in parts:
        log("lazy open ...")
        rows += lazy_open_rows(workdir, [27, 256, 2048], rounds)
    if "verify" in parts:
        log("verify ...")
        rows += verify_rows(workdir, [64 * MiB] if args.quick else [256 * MiB, 1024 * MiB], rounds)
    if "save" in parts:
        log("save ...")
        rows += save_rows(workdir, [128 * MiB] if args.quick else [512 * MiB, 1024 * MiB], rounds)
    if "legacy" in parts:
        log("legacy ...")
        rows += legacy_rows(rounds)
    if "store" in parts:
        log("store ...")
        rows += store_rows(workdir, 300 if args.quick else 1000, rounds)
    doc["rows"] = rows
    if "hashing" in parts:
        log("hashing ...")
        doc["hashing"] = hashing(64 * MiB if args.quick else 256 * MiB, rounds)
    if "growth" in parts:
        log("growth ...")
        doc["growth_tensors"] = growth_tensors(
            workdir, [27, 256, 2048] if args.quick else [27, 256, 2048, 16384], rounds)
        doc["growth_sizes"] = growth_sizes(
            workdir, [10 * MiB, 100 * MiB] if args.quick else [10 * MiB, 100 * MiB, 256 * MiB, 1024 * MiB], rounds)
    doc["loadavg_end"] = os.getloadavg()
    doc["targets"] = [{"area": "hotpaths", "target": r["measure"], "dataset": r["case"],
                       "value": r["ratio"] if r["ratio"] is not None else r["ours_ms"] / 1e3,
                       "value_from_min": r["ratio_from_min"], "value_interleaved": r["ratio"], "goal": r["goal"],
                       "met": r["met"], "noisy": False, "detail": f"{r['ours_ms']:.1f} ms"}
                      for r in rows if r["met"] is not None]
    print(report(doc))
    if args.json:
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
