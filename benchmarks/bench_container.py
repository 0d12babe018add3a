"""Container benchmark: mettaformat (raw, zstd) against safetensors, torch.save and ZipNN, in one run.

Usage::

    python -m benchmarks.bench_container [--quick] [--json OUT] [--sizes 10MiB 100MiB 1GiB]
                                         [--dir /tmp] [--only SUBSTR ...] [--formats NAME ...]
                                         [--no-rss] [--no-zipnn] [--no-recheck]

Data sets: all-MiniLM-L6-v2 (trained, fp32 and a bf16 copy), a legacy Metta checkpoint, a trained
RL policy with its Adam state (``benchmarks/rl_policy.py``, seeded) and synthetic fp32 state
dicts of 10 MiB, 100 MiB and 1 GiB (``--quick``: 10 MiB only, a smaller RL policy).

For every data set and format: file size and compression ratio (original bytes ÷ file bytes),
save, full load, full load plus touching every byte, lazy open plus ``keys()`` (header only),
lazy open plus the first tensor, and a copying load (``load_file`` then a copy of every tensor into
fresh memory, compared with ``readinto``). ZipNN (where it imports) compresses the
safetensors-serialised bytes in memory (a fresh copy each run: zipnn 0.5.4 overwrites its input).
Every timing is the median of several runs after a warm-up, with min and max; files are in page
cache. Throughput is compared with this machine's memcpy and ``readinto`` measured in the same run.

Then the targets, each a ratio measured in this run. The raw-codec comparisons with
safetensors are measured a second time with the two sides interleaved (A B B A ...), so that
load drift on a shared machine hits both alike; a target is "noisy" where the median-based,
min-based and interleaved verdicts disagree. Peak RSS (full run) comes from fresh child
processes, each reading its own ``VmHWM`` after the operation.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
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
    reference_bandwidths,
    synthetic,
    timeit,
    write_json,
)

StateDict = Mapping[str, torch.Tensor]
DEFAULT_LEVEL = 3
BIG = 512 * MiB


# -- touching every value -----------------------------------------------------------------------
def touch(sd: StateDict) -> int:
    """Read every byte of every tensor: a numpy sum over its bytes as int64 (uint8 where they do not fit).

    numpy, not torch: on 2 busy cores torch's intra-op thread pool makes small reductions 10x
    slower and erratic (a 2-thread clone of 200 tensors, 10 MB: 25-130 ms; 1 thread: 2.6 ms),
    which would swamp the loads being measured. numpy reduces on one thread at memory speed.
    """
    import numpy as np

    total = 0
    for t in sd.values():
        if t.numel() == 0:
            continue
        b = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        if b.size % 8 == 0 and b.ctypes.data % 8 == 0:
            total += int(b.view(np.int64).sum())
        else:
            total += int(b.sum())
    return total


def copy_all(sd: StateDict) -> dict[str, torch.Tensor]:
    """Every tensor copied into freshly allocated memory with a single-threaded memcpy (numpy).

    What a loader that reads into its own buffers would return: the pages are new (faulted in by
    the copy). ``clone()`` is avoided for the reason given in :func:`touch`.
    """
    import numpy as np

    out = {}
    for k, v in sd.items():
        dst = torch.empty(v.shape, dtype=v.dtype)
        if v.numel():
            np.copyto(dst.reshape(-1).view(torch.uint8).numpy(), v.contiguous().reshape(-1).view(torch.uint8).numpy())
        out[k] = dst
    return out


# -- formats --------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One way of reading a file. ``load`` is timed alone (if ``plain``) and followed by a touch (if ``touch``)."""

    name: str
    load: Callable[[Path], StateDict]
    open_keys: Callable[[Path], Any] | None = None
    open_first: Callable[[Path, str], torch.Tensor] | None = None
    plain: bool = True
    touch: bool = True


@dataclass
class Format:
    name: str
    save: Callable[[StateDict, Path], None]
    variants: list[Variant] = field(default_factory=list)
    kind: str = "raw"  # "raw", "zstd" or "peer"
    level: int | None = None


def _mf_variant(verify: bool) -> Variant:
    def load(p: Path) -> StateDict:
        return mettaformat.load_file(p, verify=verify)

    def keys(p: Path) -> Any:
        with mettaformat.open(p, verify=verify) as f:
            return f.keys()

    def first(p: Path, name: str) -> torch.Tensor:
        with mettaformat.open(p, verify=verify) as f:
            return f.get_tensor(name)

    return Variant("verify" if verify else "no-verify", load, keys, first)


def mf_raw(big: bool) -> Format:
    copy = Variant("copy", lambda p: copy_all(mettaformat.load_file(p)), touch=False)
    return Format("mf-raw", lambda sd, p: mettaformat.save_file(sd, p), [_mf_variant(True), _mf_variant(False), copy])


def mf_zstd(level: int, big: bool, both: bool) -> Format:
    variants = [_mf_variant(True)] + ([_mf_variant(False)] if both and not big else [])
    if big:  # a compressed load decodes everything: load ≈ load + touch - touch; time the latter only
        for v in variants:
            v.plain = False
    return Format(f"mf-zstd-{level}", lambda sd, p: mettaformat.save_file(sd, p, compression="zstd", level=level),
                  variants, "zstd", level)


def safetensors_format(big: bool) -> Format:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def keys(p: Path) -> Any:
        with safe_open(str(p), "pt") as f:
            return list(f.keys())

    def first(p: Path, name: str) -> torch.Tensor:
        with safe_open(str(p), "pt") as f:
            return f.get_tensor(name)

    return Format("safetensors", lambda sd, p: save_file(dict(sd), str(p)), [
        Variant("load_file", lambda p: load_file(str(p)), keys, first),
        Variant("copy", lambda p: copy_all(load_file(str(p))), touch=False),
    ], "peer")


def torch_format(big: bool) -> Format:
    def load(p: Path) -> StateDict:
        return torch.load(p, weights_only=True)

    def load_mmap(p: Path) -> StateDict:
        return torch.load(p, weights_only=True, mmap=True)

    # torch.load has no lazy open: "first tensor" is a full load (plain) or a full mmap load.
    return Format("torch", lambda sd, p: torch.save(dict(sd), p), [
        Variant("plain", load, None, None if big else (lambda p, n: load(p)[n])),
        Variant("mmap", load_mmap, None, lambda p, n: load_mmap(p)[n]),
    ], "peer")


def formats_for(ds: Dataset, quick: bool) -> list[Format]:
    """The formats measured on ``ds``: all levels on trained weights, fewer on synthetic and at 1 GiB."""
    big = ds.nbytes >= BIG
    trained = not ds.name.startswith("synthetic")
    if big:
        levels: tuple[int, ...] = (DEFAULT_LEVEL,)
    elif quick:
        levels = (1, DEFAULT_LEVEL)
    else:
        levels = (1, DEFAULT_LEVEL, 9) if trained else (1, DEFAULT_LEVEL)
    return [mf_raw(big), *[mf_zstd(lv, big, both=lv == DEFAULT_LEVEL) for lv in levels], safetensors_format(big),
            torch_format(big)]


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
             "loadavg_before": os.getloadavg(), "format_seconds": {}}
    for fmt in formats:
        path = workdir / f"bench-{ds.name}.{fmt.name}"
        try:
            t0 = time.perf_counter()
            save = timeit(lambda: fmt.save(sd, path), repeat, 1, budget_s=budget_s)
            size = path.stat().st_size
            for v in fmt.variants:
                load = timeit(lambda: v.load(path), repeat, 1, budget_s=budget_s) if v.plain else None
                load_touch = timeit(lambda: touch(v.load(path)), repeat, 1, budget_s=budget_s) if v.touch else None
                keys = timeit(lambda: v.open_keys(path), max(repeat, 5), 2) if v.open_keys else None
                first = (timeit(lambda: v.open_first(path, first_name), max(repeat, 5), 2, budget_s=max(budget_s, 1.0))
                         if v.open_first else None)
                rows.append(Row(ds.name, fmt.name, v.name, fmt.kind, fmt.level, original, size, save, load,
                                load_touch, keys, first))
            extra["format_seconds"][fmt.name] = time.perf_counter() - t0
            log(f"  {ds.name} {fmt.name}: {time.perf_counter() - t0:.1f}s")
        finally:
            path.unlink(missing_ok=True)
            gc.collect()
    extra["loadavg_after"] = os.getloadavg()
    return rows, extra


# -- ZipNN ----------------------------------------------------------------------------------------
def zipnn_version() -> str | None:
    try:
        from importlib.metadata import version

        import zipnn  # noqa: F401

        return version("zipnn")
    except Exception:
        return None


def _dominant_dtype(sd: StateDict) -> torch.dtype:
    by: dict[torch.dtype, int] = {}
    for t in sd.values():
        by[t.dtype] = by.get(t.dtype, 0) + t.numel() * t.element_size()
    return max(by, key=lambda d: by[d])


def measure_zipnn(ds: Dataset, repeat: int, budget_s: float) -> dict[str, Any] | None:
    """ZipNN (method HUFFMAN) on the safetensors-serialised bytes: ratio, encode (2 threads), decode (1, 2 threads).

    Each encode gets a fresh ``bytearray`` copy of the input, made outside the clock: zipnn 0.5.4
    overwrites the buffer it compresses. The decoded bytes are checked against the input once.
    """
    import xxhash
    import zipnn
    from safetensors.torch import save

    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(_dominant_dtype(ds.tensors))
    if dtype is None:
        return None
    blob = save(dict(ds.tensors))
    digest = xxhash.xxh3_64_intdigest(blob)
    enc2 = zipnn.ZipNN(method="HUFFMAN", input_format="byte", bytearray_dtype=dtype, threads=2)
    dec1 = zipnn.ZipNN(method="HUFFMAN", input_format="byte", bytearray_dtype=dtype, threads=1)
    holder: list[bytearray] = []

    def fresh() -> None:
        holder[:] = [bytearray(blob)]

    out: list[bytes] = []
    encode = timeit(lambda: out.append(enc2.compress(holder[0])), repeat, 1, budget_s=budget_s, setup=fresh)
    comp = bytes(out[-1])
    out.clear()
    holder.clear()
    comp_digest = xxhash.xxh3_64_intdigest(comp)
    decode2 = timeit(lambda: enc2.decompress(comp), repeat, 1, budget_s=budget_s)
    decode1 = timeit(lambda: dec1.decompress(comp), repeat, 1, budget_s=budget_s)
    roundtrip = xxhash.xxh3_64_intdigest(bytes(enc2.decompress(comp))) == digest
    return {"dtype": dtype, "input_bytes": len(blob), "compressed_bytes": len(comp), "ratio": len(blob) / len(comp),
            "encode_2t": encode, "decode_1t": decode1, "decode_2t": decode2, "roundtrip_ok": roundtrip,
            "input_intact": xxhash.xxh3_64_intdigest(blob) == digest,
            "compressed_intact_after_decode": xxhash.xxh3_64_intdigest(comp) == comp_digest,
            "encode_gbps": len(blob) / encode.median / 1e9, "decode_1t_gbps": len(blob) / decode1.median / 1e9,
            "decode_2t_gbps": len(blob) / decode2.median / 1e9}


# -- interleaved re-measurement of the raw targets ------------------------------------------------
def paired(a: Callable[[], Any], b: Callable[[], Any], rounds: int) -> dict[str, Any]:
    """Run ``a`` and ``b`` alternately (A B, then B A, ...), one warm-up each; per-round ratios a/b."""
    import gc as _gc

    def once(fn: Callable[[], Any]) -> float:
        _gc.collect()
        t0 = time.perf_counter()
        r = fn()
        t1 = time.perf_counter()
        del r
        return t1 - t0

    once(a)
    once(b)
    ta: list[float] = []
    tb: list[float] = []
    for i in range(rounds):
        if i % 2 == 0:
            ta.append(once(a))
            tb.append(once(b))
        else:
            tb.append(once(b))
            ta.append(once(a))
    ratios = [x / y for x, y in zip(ta, tb, strict=True)]
    return {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "a": Timing(statistics.median(ta), min(ta), max(ta), rounds, 1),
            "b": Timing(statistics.median(tb), min(tb), max(tb), rounds, 1), "rounds": rounds}


def recheck_raw(ds: Dataset, workdir: Path, rounds: int) -> dict[str, Any]:
    """mf-raw against safetensors, interleaved: open + first tensor, load + touch (both verify modes), save."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    sd = ds.tensors
    first = next(iter(sd))
    pm, ps = workdir / f"recheck-{ds.name}.mfmt", workdir / f"recheck-{ds.name}.safetensors"
    mettaformat.save_file(sd, pm)
    save_file(dict(sd), str(ps))

    def st_first() -> torch.Tensor:
        with safe_open(str(ps), "pt") as f:
            return f.get_tensor(first)

    def mf_first(verify: bool) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            with mettaformat.open(pm, verify=verify) as f:
                return f.get_tensor(first)
        return fn

    out: dict[str, Any] = {}
    try:
        for verify in (True, False):
            tag = "verify" if verify else "no-verify"
            out[f"open_first/{tag}"] = paired(mf_first(verify), st_first, max(rounds * 3, 15))
            out[f"load_touch/{tag}"] = paired(lambda v=verify: touch(mettaformat.load_file(pm, verify=v)),
                                              lambda: touch(load_file(str(ps))), rounds)
        pm2, ps2 = workdir / f"recheck-{ds.name}-2.mfmt", workdir / f"recheck-{ds.name}-2.safetensors"
        out["save"] = paired(lambda: mettaformat.save_file(sd, pm2), lambda: save_file(dict(sd), str(ps2)),
                             max(3, rounds // 2 + 1))
    finally:
        for p in (pm, ps, workdir / f"recheck-{ds.name}-2.mfmt", workdir / f"recheck-{ds.name}-2.safetensors"):
            p.unlink(missing_ok=True)
    return out


# -- tables ---------------------------------------------------------------------------------------
def table(rows: list[Row], touch_only: Timing, ref: Mapping[str, Any]) -> str:
    headers = ["format", "read", "file MB", "ratio", "save ms", "load ms", "load+touch ms", "open+keys ms",
               "open+first ms", "load+touch GB/s", "% of readinto", "% of memcpy"]
    readinto, memcpy = ref["readinto_page_cache_gbps"], ref["memcpy_numpy_1thread_gbps"]
    out = []
    for r in rows:
        t = r.load_touch or r.load
        g = r.original_bytes / t.median / 1e9 if t else None
        label = r.variant if r.load_touch or not r.load else f"{r.variant} (load = fresh copy)"
        out.append([r.format, label, f"{r.file_bytes / 1e6:.2f}", f"{r.ratio:.3f}", fmt_ms(r.save),
                    fmt_ms(r.load), fmt_ms(r.load_touch), fmt_ms(r.open_keys), fmt_ms(r.open_first),
                    f"{g:.2f}" if g else None, f"{100 * g / readinto:.0f}%" if g else None,
                    f"{100 * g / memcpy:.0f}%" if g else None])
    return (markdown_table(headers, out)
            + f"\n\nTimes: median (min–max) in ms. Touching the same tensors already in RAM costs {fmt_ms(touch_only)} ms."
            " GB/s = original bytes ÷ median time of load+touch (or of the copying load); compared with this run's "
            "`readinto` and memcpy. \"copy\" = `load_file`, then every tensor copied into fresh memory (numpy memcpy).")


def zipnn_table(results: dict[str, dict[str, Any]], rows: list[Row]) -> str:
    out = []
    for ds, z in results.items():
        mf = {r.format: r for r in rows if r.dataset == ds and r.kind == "zstd" and r.variant == "verify"}
        best = max(mf.values(), key=lambda r: r.ratio, default=None)
        d3 = mf.get(f"mf-zstd-{DEFAULT_LEVEL}")
        dec3 = (d3.original_bytes / (d3.load or d3.load_touch).median / 1e9) if d3 and (d3.load or d3.load_touch) else None
        enc3 = d3.original_bytes / d3.save.median / 1e9 if d3 and d3.save else None
        out.append([ds, f"{z['ratio']:.3f}", f"{d3.ratio:.3f}" if d3 else None,
                    f"{best.format} {best.ratio:.3f}" if best else None,
                    f"{z['encode_gbps']:.2f}", f"{enc3:.2f}" if enc3 else None,
                    f"{z['decode_1t_gbps']:.2f} / {z['decode_2t_gbps']:.2f}", f"{dec3:.2f}" if dec3 else None,
                    "ok" if z["roundtrip_ok"] and z["input_intact"] else "FAILED"])
    return (markdown_table(["data set", "ZipNN ratio", f"mf zstd-{DEFAULT_LEVEL} ratio", "best mf level",
                            "ZipNN encode GB/s (2 thr)", f"mf zstd-{DEFAULT_LEVEL} save GB/s",
                            "ZipNN decode GB/s (1 / 2 thr)", f"mf zstd-{DEFAULT_LEVEL} load GB/s", "round trip"], out)
            + "\n\nZipNN works on bytes in memory (method HUFFMAN, the safetensors-serialised state dict, a fresh "
            "copy per run); mettaformat's save and load include writing and reading the file, checksums and building "
            "tensors. Throughputs are original bytes ÷ median time.")


def growth_table(rows: list[Row]) -> str:
    """Cost per MB from the smallest to the largest synthetic data set, per format and operation."""
    synth = sorted({r.dataset: r.original_bytes for r in rows if r.dataset.startswith("synthetic")}.items(),
                   key=lambda kv: kv[1])
    if len(synth) < 2:
        return ""
    names = [n for n, _ in synth]
    keys: list[tuple[str, str]] = []
    for r in rows:
        if r.dataset in names and (r.format, r.variant) not in keys:
            keys.append((r.format, r.variant))
    out = []
    saved: set[str] = set()
    for fmt, var in keys:
        metrics = []
        if fmt not in saved:
            metrics.append(("save", "save", "save"))
            saved.add(fmt)
        metrics += [("load_touch", "load+touch", var), ("load", "copying load", var), ("open_first", "open+first", var)]
        for attr, label, read in metrics:
            if attr == "load" and var != "copy":
                continue
            cells: list[Any] = [fmt, read if attr != "save" else "", label]
            vals: list[tuple[float, int] | None] = []
            for n, size in synth:
                r = next((x for x in rows if x.dataset == n and x.format == fmt and x.variant == var), None)
                t = getattr(r, attr) if r else None
                if t is None:
                    cells.append(None)
                    vals.append(None)
                    continue
                per = t.median * 1e3 if attr == "open_first" else t.median * 1e3 / (size / 1e6)
                cells.append(f"{per:.3g}")
                vals.append((t.median, size))
            if all(v is None for v in vals):
                continue
            first, last = vals[0], vals[-1]
            cells.append(f"{last[0] / first[0]:.1f}× for {last[1] / first[1]:.0f}× the bytes" if first and last else None)
            out.append(cells)
    head = ["format", "read", "metric"] + [n.removeprefix("synthetic-") for n in names] + ["time growth, smallest → largest"]
    return (markdown_table(head, out) + "\n\nsave, load+touch and copying load: ms per MB (constant = linear cost); "
            "open+first: ms (constant = independent of file size, though the first tensor grows with the data set: "
            "0.1 MB at 10 MiB, 10.8 MB at 1 GiB, and verify hashes it). At 1 GiB only mf-raw, mf-zstd-3 (verify), "
            "safetensors and torch run.")


def rows_from_json(rows: list[dict[str, Any]]) -> list[Row]:
    """:class:`Row` objects back from the JSON (for re-rendering tables)."""
    def t(d: dict[str, Any] | None) -> Timing | None:
        if not d:
            return None
        return Timing(d["median_ms"] / 1e3, d["min_ms"] / 1e3, d["max_ms"] / 1e3, d["runs"], d["warmup"])

    return [Row(r["dataset"], r["format"], r["variant"], r["kind"], r["level"], r["original_bytes"], r["file_bytes"],
                t(r["save"]), t(r["load"]), t(r["load_touch"]), t(r["open_keys"]), t(r["open_first"])) for r in rows]


# -- targets ------------------------------------------------------------------------------------
def _find(rows: list[Row], dataset: str, fmt: str, variant: str | None = None) -> Row | None:
    for r in rows:
        if r.dataset == dataset and r.format == fmt and (variant is None or r.variant == variant):
            return r
    return None


def _target(out: list[dict[str, Any]], target: str, dataset: str, value: float | None, goal: str,
            ok: Callable[[float], bool], detail: str, value_min: float | None = None,
            value_interleaved: float | None = None, area: str = "container") -> None:
    """Record one target. The verdict uses the interleaved ratio where measured, else the medians;
    "noisy" marks a disagreement between the verdicts of medians, mins and the interleaved run."""
    verdicts = [ok(v) for v in (value, value_min, value_interleaved) if v is not None]
    decisive = value_interleaved if value_interleaved is not None else value
    out.append({"area": area, "target": target, "dataset": dataset, "value": value, "value_from_min": value_min,
                "value_interleaved": value_interleaved, "goal": goal,
                "met": None if decisive is None else ok(decisive), "noisy": len(set(verdicts)) > 1,
                "detail": detail})


def targets(rows: list[Row], datasets: list[str], ref: Mapping[str, Any], zip_results: Mapping[str, Any],
            recheck: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target as a ratio measured in this run, per data set."""
    out: list[dict[str, Any]] = []
    for ds in datasets:
        st = _find(rows, ds, "safetensors", "load_file")
        rc = recheck.get(ds, {})
        for variant in ("verify", "no-verify"):
            raw = _find(rows, ds, "mf-raw", variant)
            if not (st and raw):
                continue
            if raw.open_first and st.open_first:
                p = rc.get(f"open_first/{variant}")
                _target(out, f"lazy open + first tensor, mf-raw ({variant}) ÷ safetensors", ds,
                        raw.open_first.median / st.open_first.median, "≤ 1.0", lambda v: v <= 1.0,
                        f"{raw.open_first.median * 1e3:.3f} vs {st.open_first.median * 1e3:.3f} ms",
                        raw.open_first.min / st.open_first.min, p["ratio_median"] if p else None)
            if raw.load_touch and st.load_touch:
                p = rc.get(f"load_touch/{variant}")
                _target(out, f"full load + touch, mf-raw ({variant}) ÷ safetensors", ds,
                        raw.load_touch.median / st.load_touch.median, "≤ 1.1", lambda v: v <= 1.1,
                        f"{raw.load_touch.median * 1e3:.2f} vs {st.load_touch.median * 1e3:.2f} ms",
                        raw.load_touch.min / st.load_touch.min, p["ratio_median"] if p else None)
        raw = _find(rows, ds, "mf-raw", "verify")
        if st and raw and raw.save and st.save:
            p = rc.get("save")
            _target(out, "save, mf-raw ÷ safetensors save_file", ds, raw.save.median / st.save.median, "≤ 1.0",
                    lambda v: v <= 1.0, f"{raw.save.median * 1e3:.1f} vs {st.save.median * 1e3:.1f} ms",
                    raw.save.min / st.save.min, p["ratio_median"] if p else None)
        cp = _find(rows, ds, "mf-raw", "copy")
        if cp and cp.load and cp.original_bytes >= 50 * MiB:
            g = cp.original_bytes / cp.load.median / 1e9
            gmin = cp.original_bytes / cp.load.min / 1e9
            rd = ref["readinto_page_cache_gbps"]
            _target(out, "copying load (load_file + copy to fresh memory) ÷ readinto", ds, g / rd, "≥ 0.70",
                    lambda v: v >= 0.70, f"{g:.2f} GB/s vs readinto {rd:.2f} GB/s (allocating read_bytes: "
                    f"{ref['read_bytes_allocating_gbps']:.2f} GB/s)", gmin / rd)
        z = f"mf-zstd-{DEFAULT_LEVEL}"
        for variant in ("verify", "no-verify"):
            zr = _find(rows, ds, z, variant)
            t = zr.load or zr.load_touch if zr else None
            if zr and t and zr.original_bytes >= MiB * 8:
                _target(out, f"zstd-{DEFAULT_LEVEL} decode, load_file ({variant}), 2 threads, GB/s", ds,
                        zr.original_bytes / t.median / 1e9, "≥ 1.5", lambda v: v >= 1.5,
                        f"{zr.original_bytes / 1e6:.1f} MB in {t.median * 1e3:.1f} ms"
                        + ("" if zr.load else " (incl. touch)"), zr.original_bytes / t.min / 1e9)
        zr = _find(rows, ds, z, "verify")
        if zr and zr.save and zr.original_bytes >= MiB * 8:
            _target(out, f"zstd encode at the default level ({DEFAULT_LEVEL}), MB/s", ds,
                    zr.original_bytes / zr.save.median / 1e6, "≥ 400", lambda v: v >= 400,
                    f"{zr.original_bytes / 1e6:.1f} MB in {zr.save.median * 1e3:.1f} ms", zr.original_bytes / zr.save.min / 1e6)
        zp = zip_results.get(ds)
        if zp and zr and not ds.startswith("synthetic"):
            best = max((r for r in rows if r.dataset == ds and r.kind == "zstd"), key=lambda r: r.ratio)
            ref_ratio = {"minilm-fp32": 1.22, "minilm-bf16": 1.50}.get(ds)
            _target(out, f"compressed size: mf zstd-{DEFAULT_LEVEL} ratio ÷ ZipNN ratio (same run)", ds,
                    zr.ratio / zp["ratio"], "≥ 1.0", lambda v: v >= 1.0,
                    f"mf {zr.ratio:.3f} vs ZipNN {zp['ratio']:.3f}"
                    + (f" (target: {ref_ratio})" if ref_ratio else "") + f"; best mf: {best.format} {best.ratio:.3f}")
    # constant-time lazy open: header only, same 200-tensor header at every synthetic size
    synth = sorted({r.dataset: r.original_bytes for r in rows if r.dataset.startswith("synthetic")}.items(),
                   key=lambda kv: kv[1])
    if len(synth) >= 2:
        small, large = synth[0][0], synth[-1][0]
        a, b = _find(rows, large, "mf-raw", "verify"), _find(rows, small, "mf-raw", "verify")
        if a and b and a.open_keys and b.open_keys:
            _target(out, "lazy open + keys constant in file size: mf-raw time at largest ÷ smallest", f"{large} vs {small}",
                    a.open_keys.median / b.open_keys.median, "≤ 1.5 (noise allowance)", lambda v: v <= 1.5,
                    f"{a.open_keys.median * 1e3:.2f} vs {b.open_keys.median * 1e3:.2f} ms, same 200-tensor header",
                    a.open_keys.min / b.open_keys.min)
    return out


def targets_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for t in results:
        met = {True: "met", False: "**not met**", None: "n/a"}[t["met"]]
        if t["noisy"]:
            met += " (noisy)"
        f = lambda v: f"{v:.3f}" if isinstance(v, float) else "—"
        rows.append([t["target"], t["dataset"], f(t["value"]), f(t.get("value_from_min")), f(t.get("value_interleaved")),
                     t["goal"], met, t["detail"]])
    return markdown_table(["target", "data set", "ratio (medians)", "ratio (mins)", "ratio (interleaved)", "goal",
                           "result", "detail (medians)"], rows)


# -- peak RSS -------------------------------------------------------------------------------------
_RSS_CHILD = """
import json, sys
sys.path.insert(0, {root!r})
import torch, mettaformat
from benchmarks._harness import synthetic
from benchmarks.bench_container import touch
""" + CHILD_RSS_HELPERS + """
def _kb(key): return _status(key)
{prepare}
p = {path!r}
base = rss()
reset_peak()
after_reset = peak()
{op}
print(json.dumps({{"base": base, "after_reset": after_reset, "peak": peak(), "rss_end": rss(),
                  "anon_end": _kb('RssAnon'), "file_end": _kb('RssFile')}}))
"""


def _child(code: str, timeout: float = 300) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                       timeout=timeout)
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout)[-500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def peak_rss(workdir: Path, size: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Peak RSS of one operation, each in a fresh ``python -c`` child that reads its own ``VmHWM``.

    The child resets its high-water mark just before the operation (``/proc/self/clear_refs``)
    and checks that the reset took (``after_reset`` ≈ ``base``); it reports ``VmHWM`` after the
    operation, and the anonymous and file-backed RSS at the end. No ``ru_maxrss`` is used: Linux
    carries a parent's maximum RSS across fork and exec into the child's.
    """
    saves = {
        "mf-raw": "mettaformat.save_file(sd, p)",
        f"mf-zstd-{DEFAULT_LEVEL}": f"mettaformat.save_file(sd, p, compression='zstd', level={DEFAULT_LEVEL})",
        "safetensors": "from safetensors.torch import save_file; save_file(sd, p)",
        "torch": "torch.save(sd, p)",
    }
    loads = {
        "mf-raw": ["sd = mettaformat.load_file(p)"],
        f"mf-zstd-{DEFAULT_LEVEL}": ["sd = mettaformat.load_file(p)"],
        "safetensors": ["from safetensors.torch import load_file; sd = load_file(p)"],
        "torch": ["sd = torch.load(p, weights_only=True)", "sd = torch.load(p, weights_only=True, mmap=True)"],
    }
    out = []
    for name, save in saves.items():
        path = str(workdir / f"rss.{name}")
        r = _child(_RSS_CHILD.format(root=str(REPO_ROOT), prepare=f"sd = synthetic({size}).tensors", path=path, op=save))
        out.append({"op": "save", "format": name, **r})
        for load in loads[name]:
            label = name + ("-mmap" if "mmap=True" in load else "")
            r = _child(_RSS_CHILD.format(root=str(REPO_ROOT), prepare="", path=path, op=load + "\ntouch(sd)"))
            out.append({"op": "load+touch", "format": label, **r})
        Path(path).unlink(missing_ok=True)
        log(f"  peak RSS {name} done")
    for r in out:
        if "peak" in r:
            r["extra"] = r["peak"] - r["base"]
            r["reset_ok"] = r["after_reset"] <= r["base"] + 4 * MiB
    return out


def rss_table(rss: list[dict[str, Any]], size: int) -> str:
    rows = []
    for r in rss:
        if "error" in r:
            rows.append([r["op"], r["format"], "error", r["error"][-80:], "", "", "", ""])
            continue
        mb = lambda v: f"{v / 1e6:.0f}"
        rows.append([r["op"], r["format"], mb(r["base"]), mb(r["peak"]), mb(r["extra"]),
                     f"{r['extra'] / size:.2f}", mb(r["anon_end"]), mb(r["file_end"]),
                     "yes" if r["reset_ok"] else "NO (peak includes start-up)"])
    return (markdown_table(["op", "format", "before MB", "peak MB", "extra MB", "extra ÷ data", "anon at end MB",
                            "file-backed at end MB", "peak reset ok"], rows)
            + f"\n\nOne fresh `python -c` child per operation on {size / MiB:.0f} MiB of synthetic fp32. before = the "
            "child's RSS just before the step (the generated tensors for a save; the imports for a load); peak = the "
            "child's own `VmHWM` after the step, reset through `/proc/self/clear_refs` just before it. Touched pages of a "
            "mapped file count as file-backed RSS (page cache shared with other processes), so a mapped load + touch "
            "shows the file size as extra without allocating it.")


# -- main -----------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    units = {"GIB": GiB, "MIB": MiB, "GB": 10**9, "MB": 10**6, "G": GiB, "M": MiB}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_container", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 MiB synthetic and a small RL policy, zstd 1 and 3, fewer "
                    "repeats, no peak RSS")
    ap.add_argument("--json", type=Path, default=None, help="write results here (default bench-out/container[-quick].json)")
    ap.add_argument("--sizes", nargs="+", default=None, help="synthetic sizes, e.g. 10MiB 100MiB 1GiB")
    ap.add_argument("--dir", type=Path, default=Path("/tmp"), help="where files are written (default /tmp)")
    ap.add_argument("--only", nargs="+", default=None, help="only data sets whose name contains one of these")
    ap.add_argument("--formats", nargs="+", default=None, help="only these formats (e.g. mf-raw safetensors)")
    ap.add_argument("--repeat", type=int, default=None, help="measured runs per timing")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS children")
    ap.add_argument("--no-zipnn", action="store_true", help="skip ZipNN")
    ap.add_argument("--no-recheck", action="store_true", help="skip the interleaved re-measurement of the raw targets")
    return ap


def run(args: argparse.Namespace, emit: Callable[[str], None] = print, *, preamble: bool = True) -> dict[str, Any]:
    """Measure everything; ``emit`` gets the markdown report, piece by piece (without the environment
    and reference lines unless ``preamble``). Returns the JSON document."""
    started = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    workdir = Path(args.dir) / f"mettaformat-bench-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [parse_size(s) for s in args.sizes] if args.sizes else ([10 * MiB] if args.quick else [10 * MiB, 100 * MiB, GiB])
    # --quick: 3 runs, and slow timings cut to 2 runs after the warm-up (budget 0.3 s).
    # Full: 5 runs, slow ones (zstd saves, 1 GiB) cut to fit about 1.5 s each (never under 2 runs).
    repeat = args.repeat or (3 if args.quick else 5)
    budget = 0.3 if args.quick else 1.5

    env = environment(workdir)
    env["zipnn"] = zipnn_version()
    say = emit if preamble else (lambda _: None)
    say(f"{env['cpu_model']}, {env['cpu_count']} cores, {env['platform']}; python {env['python']}, torch "
         f"{env['torch']} ({env['torch_threads']} threads), safetensors {env['safetensors']}, zstandard "
         f"{env['zstandard']} (libzstd {env['libzstd']}), zipnn {env['zipnn'] or 'not installed'}.\n"
         f"Files in {workdir} on {env['workdir_fs']}: page cache, warm. Load average at start: "
         f"{', '.join(f'{x:.2f}' for x in env['loadavg_at_start'])}.\n")

    ref = reference_bandwidths(workdir, size=(64 if args.quick else 256) * MiB, repeat=repeat)
    say(f"Reference ({ref['size_bytes'] // MiB} MiB, this run): memcpy into a preallocated buffer "
         f"{ref['memcpy_numpy_1thread_gbps']:.2f} GB/s (numpy, 1 thread), {ref['memcpy_torch_copy_gbps']:.2f} GB/s "
         f"(torch copy_); readinto from page cache {ref['readinto_page_cache_gbps']:.2f} GB/s; read_bytes "
         f"(allocating) {ref['read_bytes_allocating_gbps']:.2f} GB/s.\n")

    makers: list[tuple[str, Callable[[], list[Dataset]]]] = []
    skipped: dict[str, str] = {}
    minilm, reason = load_minilm()
    if reason:
        skipped["minilm"] = reason
    for d in minilm:
        makers.append((d.name, lambda d=d: [d]))
    metta, reason = load_metta_fixture()
    if reason:
        skipped["metta"] = reason
    for d in metta:
        makers.append((d.name, lambda d=d: [d]))

    def rl() -> list[Dataset]:
        from benchmarks.rl_policy import rl_policy_dataset

        return [rl_policy_dataset(256 if args.quick else 512)]

    makers.append(("rl-policy-adam", rl))
    for s in sizes:
        label = f"{s / MiB:.0f}MiB" if s < GiB else f"{s / GiB:.0f}GiB"
        makers.append((f"synthetic-{label}", lambda s=s: [synthetic(s)]))
    if args.only:
        makers = [(n, m) for n, m in makers if any(o in n for o in args.only)]
    for name, why in skipped.items():
        emit(f"Skipped data set {name}: {why}.")
    use_zipnn = not args.no_zipnn and env["zipnn"] is not None
    if not use_zipnn:
        emit("ZipNN: " + ("skipped (--no-zipnn)." if args.no_zipnn else "not installed (pip install zipnn)."))

    gc.collect()
    gc.freeze()  # long-lived objects out of the collector: per-run gc.collect() costs µs, not 0.1 s
    all_rows: list[Row] = []
    per_dataset: dict[str, Any] = {}
    zip_results: dict[str, Any] = {}
    recheck: dict[str, Any] = {}
    recheck_sets = ("minilm-fp32",) if args.quick else ("minilm-fp32", "rl-policy", "synthetic-100MiB")
    for _, make in makers:
        for ds in make():
            big = ds.nbytes >= BIG
            formats = formats_for(ds, args.quick)
            if args.formats:
                formats = [f for f in formats if f.name in args.formats]
            rep = min(repeat, 3) if big else repeat
            t0 = time.perf_counter()
            rows, extra = measure_dataset(ds, formats, workdir, rep, budget * (2 if big else 1), log)
            if use_zipnn and not big and (not args.formats or "zipnn" in args.formats):
                tz = time.perf_counter()
                z = measure_zipnn(ds, rep, budget)
                if z is not None:
                    zip_results[ds.name] = z
                    log(f"  {ds.name} zipnn: {time.perf_counter() - tz:.1f}s")
            if not args.no_recheck and any(ds.name.startswith(s) for s in recheck_sets):
                tr = time.perf_counter()
                recheck[ds.name] = recheck_raw(ds, workdir, 5 if args.quick else 7)
                log(f"  {ds.name} interleaved recheck: {time.perf_counter() - tr:.1f}s")
            all_rows += rows
            per_dataset[ds.name] = {**ds.describe(), **extra, "repeat": rep, "seconds": time.perf_counter() - t0}
            emit(f"## {ds.name}: {len(ds.tensors)} tensors, {ds.nbytes / 1e6:.1f} MB\n\n{ds.note}. First tensor "
                 f"{extra['first_tensor']!r} ({extra['first_tensor_bytes']} bytes); {rep} runs after 1 warm-up (slow "
                 f"timings cut to fit the budget, at least 2: see JSON); load average {extra['loadavg_before'][0]:.2f} → "
                 f"{extra['loadavg_after'][0]:.2f}.\n")
            emit(table(rows, extra["touch_in_memory"], ref) + "\n")
            ds.tensors.clear()
            gc.collect()

    if zip_results:
        emit("## ZipNN against mettaformat zstd, same run\n")
        emit(zipnn_table(zip_results, all_rows) + "\n")
    growth = growth_table(all_rows)
    if growth:
        emit("## Cost growth with size (synthetic fp32, 200 tensors)\n")
        emit(growth + "\n")
    if recheck:
        rows = []
        for ds, checks in recheck.items():
            for what, p in checks.items():
                rows.append([ds, what, fmt_ms(p["a"]), fmt_ms(p["b"]),
                             f"{p['ratio_median']:.3f} ({p['ratio_min']:.3f}–{p['ratio_max']:.3f})", p["rounds"]])
        emit("## Raw targets re-measured, interleaved with safetensors\n")
        emit(markdown_table(["data set", "what", "mf-raw ms", "safetensors ms", "ratio: median of rounds (min–max)",
                             "rounds"], rows)
             + "\n\nEach round runs both sides back to back, alternating which goes first; the ratio is taken per "
               "round, so a load spike from another process hits both sides of the same ratio.\n")

    results = targets(all_rows, list(per_dataset), ref, zip_results, recheck)
    emit("## Container targets, ratios measured in this run\n")
    emit(targets_table(results) + "\n")

    rss: list[dict[str, Any]] = []
    rss_size = 100 * MiB
    if not args.quick and not args.no_rss:
        rss = peak_rss(workdir, rss_size, log)
        emit(f"## Peak RSS, {rss_size // MiB} MiB synthetic, fresh child per operation\n")
        emit(rss_table(rss, rss_size) + "\n")

    try:
        workdir.rmdir()
    except OSError:
        pass
    elapsed = time.perf_counter() - started
    env["loadavg_at_end"] = os.getloadavg()
    return {"environment": env, "reference": ref, "quick": args.quick, "repeat": repeat, "budget_s": budget,
            "skipped": skipped, "datasets": per_dataset, "rows": [r.as_dict() for r in all_rows],
            "zipnn": zip_results, "recheck": recheck, "targets": results, "peak_rss": rss,
            "peak_rss_size_bytes": rss_size if rss else None, "elapsed_s": elapsed}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"# mettaformat container benchmark{' (--quick)' if args.quick else ''}\n")
    doc = run(args)
    out = args.json or REPO_ROOT / "bench-out" / f"container{'-quick' if args.quick else ''}.json"
    write_json(out, doc)
    print(f"Total {doc['elapsed_s']:.0f} s. JSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
