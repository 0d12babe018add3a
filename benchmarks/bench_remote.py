"""Remote checkpoints over loopback servers: requests, bytes and time, against downloading whole objects.

Usage::

    python -m benchmarks.bench_remote [--quick] [--size-mib 1024] [--count 1000] [--json OUT]

Two data sets, each served by a real server on 127.0.0.1 started here:

- one large container (1 GiB of 4 MiB fp32 tensors) on the counting Range HTTP server, with the
  same weights as ``.safetensors`` and ``torch.save`` files: open + read one tensor, and a whole
  load, against the user's baseline today (download the whole object, then
  ``safetensors.torch.load`` / ``torch.load``) and a plain sequential download by the same client;
- ``--count`` small checkpoints in a moto S3 bucket: select the top 5 by metric through
  ``PolicyStore("s3://...")`` (headers only: read one by one, from the prefix's index checked
  against a full listing, or from an index a recent listing vouches for, as by default), against
  downloading every ``.pt`` file and reading its metadata with ``torch.load``.

Servers run in this process (threads), so server and client share the two cores: absolute
throughput is low, and every comparison is a ratio of two timings from the same run.
"""

from __future__ import annotations

import argparse
import gc
import io
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import mettaformat as mf
from benchmarks._harness import environment, markdown_table, timeit, write_json
from mettaformat.remote import transport

MiB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _servers() -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import remote_servers

    return remote_servers


# -- the large file --------------------------------------------------------------------------------
def large_file(workdir: Path, size_mib: int, repeat: int) -> tuple[list[list[str]], list[dict[str, Any]], dict[str, Any]]:
    import fsspec
    import safetensors.torch

    servers = _servers()
    n = max(1, size_mib // 4)
    log(f"[remote] writing {n} x 4 MiB tensors as .mfmt, .safetensors and .pt ...")
    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.rand(1024, 1024, generator=g) for i in range(n)}
    paths = {"mfmt": workdir / "big.mfmt", "zstd": workdir / "big.zstd.mfmt",
             "safetensors": workdir / "big.safetensors", "pt": workdir / "big.pt"}
    mf.save_file(tensors, paths["mfmt"])
    mf.save_file(tensors, paths["zstd"], compression="zstd")
    safetensors.torch.save_file(tensors, paths["safetensors"])
    torch.save(tensors, paths["pt"])
    one = f"layers.{n // 2}.weight"
    del tensors
    gc.collect()
    server = servers.RangeServer().start()
    try:
        for path in paths.values():
            server.objects[path.name] = path
        url = {k: server.url(p.name) for k, p in paths.items()}
        fs = fsspec.filesystem("http")
        size = paths["mfmt"].stat().st_size

        def counted(fn: Callable[[], Any]) -> tuple[Any, int, int]:
            server.reset_counts()
            fn()
            return None, server.requests, server.bytes_sent

        def open_one(kind: str = "mfmt") -> torch.Tensor:
            with mf.open(url[kind]) as ckpt:
                return ckpt.get_tensor(one)

        def download_st_one() -> torch.Tensor:
            return safetensors.torch.load(fs.cat_file(url["safetensors"]))[one]

        def download_pt_one() -> torch.Tensor:
            return torch.load(io.BytesIO(fs.cat_file(url["pt"])), weights_only=True)[one]

        rows: list[list[str]] = []
        measured: dict[str, Any] = {}
        cases = [
            ("open + read one 4 MiB tensor", "mettaformat (range reads)", open_one, repeat),
            ("open + read one 4 MiB tensor", "mettaformat zstd (range reads)", lambda: open_one("zstd"), repeat),
            ("open + read one 4 MiB tensor", "download + safetensors.load", download_st_one, 2),
            ("open + read one 4 MiB tensor", "download + torch.load", download_pt_one, 2),
            ("whole load", "plain sequential download (bytes only)", lambda: fs.cat_file(url["mfmt"]), 2),
            ("whole load", "mettaformat load_file (parallel ranges)", lambda: mf.load_file(url["mfmt"]), 2),
            ("whole load", "download + safetensors.load", lambda: safetensors.torch.load(fs.cat_file(url["safetensors"])), 2),
            ("whole load", "download + torch.load", lambda: torch.load(io.BytesIO(fs.cat_file(url["pt"])), weights_only=True), 2),
        ]
        for task, how, fn, runs in cases:
            log(f"[remote] {task}: {how} ...")
            _, requests, nbytes = counted(fn)
            t = timeit(fn, repeat=runs, warmup=0)
            measured[f"{task} | {how}"] = {"median_s": t.median, "min_s": t.min, "requests": requests, "bytes": nbytes}
            rows.append([task, how, f"{t.median * 1e3:.0f}", str(requests), f"{nbytes / MiB:.2f}",
                         f"{size / t.median / MiB:.0f}" if task == "whole load" else ""])
    finally:
        server.stop()
    plain = measured["whole load | plain sequential download (bytes only)"]
    ours = measured["whole load | mettaformat load_file (parallel ranges)"]
    share = plain["median_s"] / ours["median_s"]
    targets = []
    for kind, how in (("raw", "mettaformat (range reads)"), ("zstd", "mettaformat zstd (range reads)")):
        one_m = measured[f"open + read one 4 MiB tensor | {how}"]
        targets.append(
            {"area": "remote", "target": f"open 1 GiB ({kind}) + read one 4 MiB tensor: < 5 MiB and <= 3 requests",
             "dataset": f"{size / MiB:.0f} MiB container over HTTP", "value": one_m["bytes"] / MiB,
             "value_from_min": None, "value_interleaved": None, "goal": "< 5 MiB, <= 3 requests",
             "met": one_m["bytes"] < 5 * MiB and one_m["requests"] <= 3, "noisy": False,
             "detail": f"{one_m['bytes'] / MiB:.2f} MiB in {one_m['requests']} requests"})
    targets += [
        {"area": "remote", "target": "whole remote load throughput / plain sequential download",
         "dataset": f"{size / MiB:.0f} MiB container over HTTP", "value": share, "value_from_min": None,
         "value_interleaved": None, "goal": ">= 0.5", "met": share >= 0.5, "noisy": False,
         "detail": f"load {ours['median_s']:.2f} s, download {plain['median_s']:.2f} s"},
    ]
    return rows, targets, measured


# -- many small checkpoints ---------------------------------------------------------------------------
def many_small(workdir: Path, count: int, params: int) -> tuple[list[list[str]], list[dict[str, Any]], dict[str, Any]]:
    import s3fs

    from mettaformat.remote import store as remote_store

    servers = _servers()
    rng = random.Random(0)
    with servers.moto_s3("runs", own_process=True) as bucket:
        fs = s3fs.S3FileSystem()
        log(f"[remote] uploading {count} small checkpoints (.mfmt and .pt) to moto S3 ...")
        blobs_mfmt, blobs_pt, scores = {}, {}, {}
        for i in range(count):
            weights = {"policy.weight": torch.rand(params, generator=torch.Generator().manual_seed(i))}
            meta = {"epoch": i, "agent_step": i * 1000, "score": rng.random()}
            scores[i] = meta["score"]
            blobs_mfmt[f"{bucket}/mfmt/model_{i:04d}.mfmt"] = mf.save(weights, metadata=meta)
            buf = io.BytesIO()
            torch.save({"state_dict": weights, "metadata": meta}, buf)
            blobs_pt[f"{bucket}/pt/model_{i:04d}.pt"] = buf.getvalue()
        fs.pipe(blobs_mfmt)
        fs.pipe(blobs_pt)
        file_bytes = len(next(iter(blobs_mfmt.values())))
        del blobs_mfmt, blobs_pt
        truth = sorted(scores, key=lambda i: -scores[i])[:5]

        modes = {
            "no index: every header by range": {"use_index": False},
            "index checked against a full listing": {"index_max_age_s": 0},
            "index of a recent listing (default)": {},
        }

        def ours(mode: str) -> list[int]:
            remote_store._memo.clear()  # as a fresh process: nothing remembered
            store = mf.PolicyStore(f"{bucket}/mfmt/", **modes[mode])
            return [r.epoch for r in store.select(n=5, metric="score").records]

        def baseline() -> list[int]:
            fs.invalidate_cache()
            paths = fs.ls(f"{bucket}/pt/")
            blobs = fs.cat(paths)  # fsspec downloads them concurrently
            metas = [torch.load(io.BytesIO(b), weights_only=True)["metadata"] for b in blobs.values()]
            return [m["epoch"] for m in sorted(metas, key=lambda m: -m["score"])[:5]]

        assert all(ours(mode) == truth for mode in modes) and baseline() == truth
        log("[remote] timing the selections ...")
        counts, times = {}, {}
        for mode in modes:
            ours(mode)  # the previous mode listed and wrote the index: every mode starts from the same state
            r0, b0 = transport.STATS.snapshot()
            ours(mode)
            r1, b1 = transport.STATS.snapshot()
            counts[mode] = (r1 - r0, b1 - b0)
            times[mode] = timeit(lambda mode=mode: ours(mode), repeat=3, warmup=0)
        t_base = timeit(baseline, repeat=2, warmup=0)
    total = count * file_bytes
    rows = [[f"top 5 of {count}", f"PolicyStore(s3://), {mode}", f"{times[mode].median * 1e3:.0f}",
             str(counts[mode][0]), f"{counts[mode][1] / MiB:.2f}", ""] for mode in modes]
    rows.append([f"top 5 of {count}", "download every .pt + torch.load", f"{t_base.median * 1e3:.0f}", f"{count + 1}",
                 f"{total / MiB:.2f}", ""])
    targets = []
    for mode in modes:
        t, (requests, nbytes) = times[mode], counts[mode]
        speedup, speedup_min = t_base.median / t.median, t_base.min / t.min
        targets.append({
            "area": "remote", "target": f"top 5 of {count} in a bucket ({mode}) >= 20x faster than downloading all",
            "dataset": f"{count} checkpoints of {file_bytes / 1e3:.0f} kB on moto S3", "value": speedup,
            "value_from_min": speedup_min, "value_interleaved": None, "goal": ">= 20x", "met": speedup >= 20,
            "noisy": (speedup >= 20) != (speedup_min >= 20),
            "detail": f"{speedup:.1f}x: {t.median:.2f} s vs {t_base.median:.2f} s; {requests} requests, "
                      f"{nbytes / MiB:.2f} MiB vs {total / MiB:.0f} MiB"})
    return rows, targets, {"select_s": {m: times[m].median for m in modes}, "baseline_s": t_base.median,
                           "requests_bytes": counts, "file_bytes": file_bytes}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 MiB and 200 checkpoints of 0.5 MiB")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--params", type=int, default=256 * 1024, help="fp32 values per small checkpoint (1 MiB)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.size_mib, args.count, args.params = 64, 200, 128 * 1024
    with tempfile.TemporaryDirectory(prefix="mf-bench-remote-", dir=args.dir) as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        rows1, targets1, large = large_file(workdir, args.size_mib, args.repeat)
        rows2, targets2, small = many_small(workdir, args.count, args.params)
    headers = ["task", "how", "median ms", "requests", "MiB transferred", "MiB/s"]
    print("# Remote checkpoints (loopback servers)\n")
    print("Server and client share this machine's cores; compare rows of the same task.\n")
    print(markdown_table(headers, rows1 + rows2) + "\n")
    targets = targets1 + targets2
    print(markdown_table(["target", "data set", "goal", "result", "detail"],
                         [[t["target"], t["dataset"], t["goal"], "met" if t["met"] else "**not met**", t["detail"]]
                          for t in targets]))
    if args.json:
        write_json(args.json, {"environment": environment(), "large": large, "small": small, "targets": targets,
                               "elapsed_s": time.perf_counter() - started, "quick": args.quick})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
