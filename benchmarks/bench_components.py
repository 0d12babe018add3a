"""Where the time goes inside mettaformat: component timings and profiles.

Usage::

    python -m benchmarks.bench_components [--json OUT] [--dir /tmp]

Measures, on MiniLM fp32/bf16 (or a synthetic stand-in) and a 100 MiB synthetic state dict:

- compression ratio at levels 1 and 3 (``bench_codecs.py`` has every level against ZipNN);
- decode pieces: walking frame headers, ``stream_reader().readinto`` per frame, the unshuffle,
  the per-frame temporary allocation, xxh3, on one thread and on a 2-thread pool;
- encode pieces: shuffle, zstd levels 1 and 3 per 4 MiB frame, on 1 and 2 threads;
- raw save pieces: pwrite + xxh3, rename, directory fsync, on the chosen directory and tmpfs;
- ``open`` + ``keys()`` profiled with cProfile.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import xxhash
import zstandard

import mettaformat
from benchmarks._harness import REPO_ROOT, MiB, environment, load_minilm, markdown_table, synthetic, timeit, write_json
from mettaformat._torch import tensor_bytes, writable_bytes
from mettaformat.container.codecs import zstd as zmod
from mettaformat.container.codecs import zstd_frames
from mettaformat.container.codecs.shuffle import shuffle, unshuffle

FRAME = 4 << 20


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


# -- compression ratio ---------------------------------------------------------------------------
def ratios(datasets: dict[str, dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """The library's ratio per level (``benchmarks/bench_codecs.py`` compares them with ZipNN)."""
    out = []
    for name, sd in datasets.items():
        nbytes = sum(t.numel() * t.element_size() for t in sd.values())
        for level in (1, 3):
            out.append({"dataset": name, "level": level,
                        "library": nbytes / len(mettaformat.save(sd, compression="zstd", level=level))})
    return out


# -- decode / encode pieces ----------------------------------------------------------------------
def decode_pieces(path: Path, repeat: int) -> dict[str, Any]:
    ck = mettaformat.open(path, verify=False)
    reader = ck._readers["model"]
    source = ck._mapped()
    frames = reader.frames[1:]
    raw_total = sum(f[2] for f in frames)
    shuffled = [f for f in frames if f[3] in (zmod.FILTER_FLOAT_PLANES, zmod.FILTER_PLANES)]
    out = torch.empty(max(f[2] for f in frames), dtype=torch.uint8)
    out.fill_(0)
    res: dict[str, Any] = {"frames": len(frames), "plane_frames": len(shuffled), "raw_bytes": raw_total,
                           "compressed_bytes": sum(f[1] for f in frames)}

    def walk() -> None:
        for off, clen, rlen, _ in frames:
            zstd_frames.frame_length(source[off:off + clen], rlen, "x")

    def dec_prealloc(fs: list[tuple[int, int, int, int]] = frames) -> None:
        d = zstd_frames.decompressor()
        mv = writable_bytes(out)
        for off, clen, rlen, _ in fs:
            r = d.stream_reader(source[off:off + clen], read_across_frames=False)
            r.readinto(mv[:rlen])

    def dec_alloc() -> None:
        d = zstd_frames.decompressor()
        for off, clen, _rlen, _ in frames:
            d.decompress(source[off:off + clen])

    def dec_temp_alloc() -> None:  # what the library does for shuffled frames: a fresh temp per frame
        for _off, _clen, rlen, _ in frames:
            t = torch.empty(rlen, dtype=torch.uint8)
            t[::4096].fill_(1)  # touch each page

    planes = torch.empty(FRAME, dtype=torch.uint8).fill_(3)
    dst = torch.empty(FRAME, dtype=torch.uint8).fill_(0)

    def unshuf() -> None:
        for _ in range(len(frames)):
            unshuffle(planes, dst, 4)

    if True:  # (no inference_mode: it is thread-local and the pool threads write these tensors)
        t_walk = timeit(walk, repeat, 1)
        t_pre = timeit(dec_prealloc, repeat, 1)
        t_alloc = timeit(dec_alloc, repeat, 1)
        t_tmp = timeit(dec_temp_alloc, repeat, 1)
        t_unshuf = timeit(unshuf, repeat, 1)
        hashbuf = torch.empty(raw_total, dtype=torch.uint8).fill_(7)
        t_hash = timeit(lambda: xxhash.xxh3_64_intdigest(tensor_bytes(hashbuf)), repeat, 1)
        del hashbuf
        # 2-thread pool over the frames: does stream_reader.readinto release the GIL?
        half = [frames[0::2], frames[1::2]]
        outs = [torch.empty(FRAME, dtype=torch.uint8).fill_(0) for _ in range(2)]

        def dec2(i: int) -> None:
            d = zstd_frames.decompressor()
            mv = writable_bytes(outs[i])
            for off, clen, rlen, _ in half[i]:
                d.stream_reader(source[off:off + clen], read_across_frames=False).readinto(mv[:rlen])

        with ThreadPoolExecutor(2) as pool:
            t_pre2 = timeit(lambda: list(pool.map(dec2, (0, 1))), repeat, 1)
            t_unshuf2 = timeit(lambda: list(pool.map(lambda o: [unshuffle(planes, o, 4) for _ in range(len(frames) // 2)],
                                                     outs)), repeat, 1)
        t_load = timeit(lambda: mettaformat.load_file(path, verify=False), repeat, 1)
        t_load_v = timeit(lambda: mettaformat.load_file(path, verify=True), repeat, 1)
    ck.close()
    n = raw_total
    res.update({
        "walk_frame_headers_ms": t_walk.median * 1e3,
        "decode_readinto_prealloc_1thread_gbps": gbps(n, t_pre.median),
        "decode_readinto_prealloc_2threads_gbps": gbps(n, t_pre2.median),
        "decode_allocating_1thread_gbps": gbps(n, t_alloc.median),
        "fresh_4MiB_temp_per_frame_ms": t_tmp.median * 1e3,
        "unshuffle_torch_1thread_gbps": gbps(n, t_unshuf.median),
        "unshuffle_torch_2threads_gbps": gbps(n, t_unshuf2.median),
        "xxh3_gbps": gbps(n, t_hash.median),
        "load_file_no_verify_gbps": gbps(n, t_load.median),
        "load_file_verify_gbps": gbps(n, t_load_v.median),
        "load_file_no_verify_ms": t_load.median * 1e3,
        "load_file_verify_ms": t_load_v.median * 1e3,
        "timings": {k: v.as_ms() for k, v in {"walk": t_walk, "readinto1": t_pre, "readinto2": t_pre2,
                                              "alloc1": t_alloc, "temp": t_tmp, "unshuffle1": t_unshuf,
                                              "unshuffle2": t_unshuf2, "xxh3": t_hash, "load": t_load,
                                              "load_verify": t_load_v}.items()},
    })
    return res


def encode_pieces(sd: dict[str, torch.Tensor], repeat: int) -> dict[str, Any]:
    chunks = []
    for t in sd.values():
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        w = t.element_size()
        step = FRAME // w * w
        chunks += [(raw[s:s + step], w) for s in range(0, raw.numel(), step)]
    n = sum(c.numel() for c, _ in chunks)
    res: dict[str, Any] = {"raw_bytes": n, "frames": len(chunks)}
    shuffled = [(shuffle(c, w) if w > 1 else c) for c, w in chunks]
    t_shuf = timeit(lambda: [shuffle(c, w) for c, w in chunks if w > 1], repeat, 1)
    res["shuffle_torch_1thread_gbps"] = gbps(n, t_shuf.median)
    for level in (1, 3):
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
        t1 = timeit(lambda: [cctx.compress(tensor_bytes(s)) for s in shuffled], max(2, repeat // 2), 1)
        with ThreadPoolExecutor(2) as pool:
            t2 = timeit(lambda: list(pool.map(lambda s: zstd_frames.compressor((level,)).compress(tensor_bytes(s)), shuffled)),
                        max(2, repeat // 2), 1)
        res[f"zstd{level}_compress_1thread_mbps"] = n / t1.median / 1e6
        res[f"zstd{level}_compress_2threads_mbps"] = n / t2.median / 1e6
        path = Path("/tmp") / f"enc-{os.getpid()}.mfmt"
        t_save = timeit(lambda: mettaformat.save_file(sd, path, compression="zstd", level=level), max(2, repeat // 2), 1)
        path.unlink(missing_ok=True)
        res[f"save_file_zstd{level}_mbps"] = n / t_save.median / 1e6
    return res


def raw_save_pieces(sd: dict[str, torch.Tensor], dirs: list[Path], repeat: int) -> list[dict[str, Any]]:
    from safetensors.torch import save_file

    out = []
    n = sum(t.numel() * t.element_size() for t in sd.values())
    views = [tensor_bytes(t.contiguous()) for t in sd.values()]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        target = d / "save-target.bin"
        tmp = d / "save-tmp.bin"

        def pwrite_only(p: Path = target) -> None:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            pos = 0
            for v in views:
                os.pwrite(fd, v, pos)
                pos += len(v)
            os.close(fd)

        def pwrite_rename() -> None:
            pwrite_only(tmp)
            os.replace(tmp, target)

        def pwrite_rename_dirsync() -> None:
            pwrite_rename()
            fd = os.open(d, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        pwrite_only()
        row: dict[str, Any] = {"dir": str(d), "bytes": n}
        row["xxh3_all_ms"] = timeit(lambda: [xxhash.xxh3_64_intdigest(v) for v in views], repeat, 1).median * 1e3
        row["pwrite_overwrite_ms"] = timeit(pwrite_only, repeat, 1).median * 1e3
        row["pwrite_tmp_rename_ms"] = timeit(pwrite_rename, repeat, 1).median * 1e3
        row["pwrite_tmp_rename_dirfsync_ms"] = timeit(pwrite_rename_dirsync, repeat, 1).median * 1e3
        row["mettaformat_save_file_ms"] = timeit(lambda: mettaformat.save_file(sd, target), repeat, 1).median * 1e3
        row["safetensors_save_file_ms"] = timeit(lambda: save_file(sd, str(target)), repeat, 1).median * 1e3
        target.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        out.append(row)
    return out


def profile_open(path: Path, first: str, n: int = 200) -> str:
    def work() -> None:
        for _ in range(n):
            with mettaformat.open(path) as f:
                f.keys()
                f.get_tensor(first)

    pr = cProfile.Profile()
    pr.enable()
    work()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
    return s.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=REPO_ROOT / "bench-out" / "components.json")
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    workdir = args.dir / f"mettaformat-components-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    env = environment(workdir)
    minilm, reason = load_minilm()
    sets = {d.name: d.tensors for d in minilm} or {"synthetic-100MiB": synthetic(100 * MiB).tensors}
    syn = synthetic(100 * MiB).tensors
    gc.collect()
    gc.freeze()
    result: dict[str, Any] = {"environment": env, "skipped": reason}
    print("# mettaformat components\n")
    print(f"{env['cpu_model']}, {env['cpu_count']} cores; files in {workdir} ({env['workdir_fs']})\n")

    result["ratios"] = ratios(sets)
    print("\n## Compression ratio (original ÷ file bytes, 4 MiB chunks)\n")
    print(markdown_table(["data", "level", "library"],
                         [[r["dataset"], r["level"], f"{r['library']:.3f}"] for r in result["ratios"]]))

    first = next(iter(sets))
    result["decode"] = {}
    for label, level in (("library, level 1", 1), ("library, level 3", 3)):
        path = workdir / "dec.mfmt"
        mettaformat.save_file(sets[first], path, compression="zstd", level=level)
        result["decode"][label] = decode_pieces(path, args.repeat)
        path.unlink()
    print(f"\n## Decode pieces ({first})\n")
    keys = [k for k in next(iter(result["decode"].values())) if k != "timings"]
    print(markdown_table(["measure", *result["decode"]],
                         [[k, *[(f"{v[k]:.3g}" if isinstance(v[k], float) else v[k]) for v in result["decode"].values()]]
                          for k in keys]))

    result["encode"] = {k: encode_pieces(v, args.repeat) for k, v in sets.items()}
    print("\n## Encode pieces (whole-chunk shuffle in the 'zstd*_compress' rows; save_file as the library does it)\n")
    ek = list(next(iter(result["encode"].values())))
    print(markdown_table(["measure", *result["encode"]],
                         [[k, *[(f"{v[k]:.3g}" if isinstance(v[k], float) else v[k]) for v in result["encode"].values()]]
                          for k in ek]))

    dirs = [workdir]
    if Path("/dev/shm").is_dir():
        dirs.append(Path("/dev/shm") / f"mettaformat-components-{os.getpid()}")
    result["raw_save"] = raw_save_pieces(syn, dirs, args.repeat)
    print("\n## Raw save pieces, synthetic 100 MiB (ms, median)\n")
    rk = list(result["raw_save"][0])
    print(markdown_table(rk, [[(f"{r[k]:.1f}" if isinstance(r[k], float) else r[k]) for k in rk]
                              for r in result["raw_save"]]))

    path = workdir / "open.mfmt"
    mettaformat.save_file(syn, path)
    t_open = timeit(lambda: mettaformat.open(path).close(), 20, 3)
    result["open_ms"] = t_open.as_ms()
    prof = profile_open(path, next(iter(syn)))
    result["open_profile"] = prof
    print(f"\n## open + keys + first tensor, synthetic 100 MiB (200 tensors): open alone {t_open.median * 1e3:.2f} ms\n")
    print("```\n" + prof.strip() + "\n```")
    path.unlink()
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            pass
    write_json(args.json, result)
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
