"""Distributed checkpoints: MettaStorageWriter/Reader against torch's FileSystemWriter/Reader.

Two CPU ranks (gloo) each hold the same amount of sharded state (``Shard(0)`` DTensors plus a
few non-tensor items); every round saves and loads it with both layers, interleaved, in one run.
Times are the slowest rank's (what a job waits for); the verdict is the median of the per-round
ratios (each round runs both layers, in alternating order, after one warm-up round). Sizes are the
committed checkpoint (for torch, the whole directory) and, "at rest", everything in the directory:
mettaformat keeps the previous save's files to overwrite them in place (``keep_previous``);
``--one-save-at-rest`` adds a layer that does not, and writes new files each time. A save is timed until
``dcp.save`` returns; mettaformat may then still delete files in the background, which is waited for
(and reported as "save + cleanup") before the next measurement starts, so it never slows another
layer. ``--idle S`` waits S seconds before each save, as a training job does between checkpoints (a
file system's deferred work, such as discarding freed blocks, then lands inside the next save).
``python -m benchmarks.bench_dcp [--quick] [--mib 256] [--idle S] [--one-save-at-rest] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from benchmarks._harness import environment, markdown_table, write_json

MiB = 1 << 20
WORLD = 2
TARGET = 1.1  # within 1.1x of torch's layer

ONE_SAVE = "mettaformat durable, one save at rest"
#: (ours, theirs, what the pair compares)
PAIRS = (
    ("mettaformat durable", "torch FileSystem", "fsync"),
    ("mettaformat", "torch FileSystem no fsync", "no fsync"),
    (ONE_SAVE, "torch FileSystem", "fsync, keep_previous=False"),
)
DIRECTORIES = {
    "mettaformat": "metta", "mettaformat durable": "metta-durable",
    ONE_SAVE: "metta-durable-one",
    "torch FileSystem": "torch", "torch FileSystem no fsync": "torch-nosync",
}


def _state(mib_per_rank: int, mesh: Any) -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    n_tensors = 16
    rows = mib_per_rank * MiB * WORLD // n_tensors // (1024 * 4)
    g = torch.Generator().manual_seed(0)
    state: dict[str, Any] = {
        f"layers.{i}.weight": distribute_tensor(torch.randn(rows, 1024, generator=g), mesh, [Shard(0)])
        for i in range(n_tensors)
    }
    state.update({"step": 1000, "trainer": {"lr": 3e-4, "epoch": 7}})
    return state


def _layers(root: Path, one_save: bool) -> dict[str, tuple[Any, Any]]:
    from mettaformat.dcp import MettaStorageReader, MettaStorageWriter

    def pair(name: str, writer: Any, reader: Any) -> tuple[Any, Any]:
        directory = root / DIRECTORIES[name]
        return (lambda: writer(directory)), (lambda: reader(directory))

    # Same durability on both sides: torch fsyncs each file by default, mettaformat with durable=True.
    layers = {
        "mettaformat": pair("mettaformat", MettaStorageWriter, MettaStorageReader),
        "torch FileSystem no fsync": pair("torch FileSystem no fsync", partial(dcp.FileSystemWriter, sync_files=False),
                                          dcp.FileSystemReader),
        "mettaformat durable": pair("mettaformat durable", partial(MettaStorageWriter, durable=True),
                                    MettaStorageReader),
        "torch FileSystem": pair("torch FileSystem", dcp.FileSystemWriter, dcp.FileSystemReader),
    }
    if one_save:
        # First in the order: the blocks it frees are discarded inside whichever save comes next, and
        # (rounds alternate the order) that is itself or the non-durable layer, never a durable pair.
        one = pair(ONE_SAVE, partial(MettaStorageWriter, durable=True, keep_previous=False), MettaStorageReader)
        layers = {ONE_SAVE: one, **layers}
    return layers


def _timed(fn: Any) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed.item())


def _wait_for_background() -> None:
    """Return once every task queued on mettaformat's shared pool has finished: one barrier task
    per worker can only all run when no earlier task holds a worker."""
    from mettaformat._pool import shared_pool, usable_cores

    workers = usable_cores()
    barrier = threading.Barrier(workers, timeout=120)
    for done in [shared_pool().submit(barrier.wait) for _ in range(workers)]:
        done.result()


def _sizes(directory: Path) -> tuple[int, int]:
    """(committed checkpoint, everything at rest) in bytes."""
    from mettaformat.dcp import INDEX_NAME
    from mettaformat.dcp.index import read_index

    at_rest = sum(p.stat().st_size for p in directory.iterdir())
    if not (directory / INDEX_NAME).exists():
        return at_rest, at_rest
    files = read_index(directory).files
    return (directory / INDEX_NAME).stat().st_size + sum(f.size for f in files.values()), at_rest


def _worker(rank: int, tmp: str, mib: int, rounds: int, idle: float, one_save: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    root = Path(tmp)
    state = _state(mib, mesh)
    target = {k: (torch.zeros_like(v) if isinstance(v, DTensor) else type(v)()) for k, v in state.items()}
    target["trainer"] = dict.fromkeys(state["trainer"], 0)
    times: dict[str, dict[str, list[float]]] = {}
    layers = list(_layers(root, one_save).items())
    for round_ in range(rounds + 1):  # round 0 warms up both layers and is not counted
        # alternate which layer goes first, so neither always runs on a cache the other warmed
        for name, (writer, reader) in layers if round_ % 2 else layers[::-1]:
            if idle:
                dist.barrier()
                time.sleep(idle)
            save_s = _timed(lambda w=writer: dcp.save(state, storage_writer=w()))
            cleanup_s = _timed(_wait_for_background)
            load_s = _timed(lambda r=reader: dcp.load(target, storage_reader=r()))
            for k, v in state.items():
                if isinstance(v, DTensor):
                    assert torch.equal(target[k].to_local(), v.to_local()), (name, k)
            assert target["step"] == state["step"] and target["trainer"] == state["trainer"], name
            if round_:
                t = times.setdefault(name, {"save": [], "save + cleanup": [], "load": []})
                t["save"].append(save_s)
                t["save + cleanup"].append(save_s + cleanup_s)
                t["load"].append(load_s)
    if rank == 0:
        sizes = {name: _sizes(root / DIRECTORIES[name]) for name, _ in layers}
        (root / "result.json").write_text(json.dumps({"times": times, "sizes": sizes}))
    dist.barrier()
    dist.destroy_process_group()


def run(mib: int, rounds: int, workdir: str | None, idle: float = 0.0, one_save: bool = False) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="mf-bench-dcp-", dir=workdir)
    try:
        mp.spawn(_worker, args=(tmp, mib, rounds, idle, one_save), nprocs=WORLD, join=True)
        raw = json.loads((Path(tmp) / "result.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = {name: {op: min(v) for op, v in ops.items()} for name, ops in raw["times"].items()}
    targets = []
    idled = f", {idle:g} s idle before each save" if idle else ""
    for ours_name, theirs_name, durability in PAIRS:
        if ours_name not in raw["times"]:
            continue
        ours, theirs = raw["times"][ours_name], raw["times"][theirs_name]
        with_cleanup = statistics.median(
            a / b for a, b in zip(ours["save + cleanup"], theirs["save + cleanup"], strict=True))
        for op in ("save", "load"):
            from_medians = statistics.median(ours[op]) / statistics.median(theirs[op])
            from_mins = min(ours[op]) / min(theirs[op])
            interleaved = statistics.median(a / b for a, b in zip(ours[op], theirs[op], strict=True))
            verdicts = {v <= TARGET for v in (from_medians, from_mins, interleaved)}
            targets.append({
                "area": "dcp",
                "target": f"dcp {op} vs FileSystem{'Writer' if op == 'save' else 'Reader'} ({durability})",
                "goal": f"<= {TARGET}x", "dataset": f"{WORLD}x{mib} MiB", "value": from_medians,
                "value_from_min": from_mins, "value_interleaved": interleaved, "met": interleaved <= TARGET,
                "noisy": len(verdicts) > 1,
                "detail": f"slowest rank, {rounds} interleaved rounds{idled}; "
                          f"sizes {raw['sizes'][ours_name][0]} vs {raw['sizes'][theirs_name][0]} bytes, at rest "
                          f"{raw['sizes'][ours_name][1]} vs {raw['sizes'][theirs_name][1]}"
                          + (f"; save + cleanup {with_cleanup:.2f}x" if op == "save" else ""),
            })
    return {"mib_per_rank": mib, "rounds": rounds, "idle_s": idle, "times": raw["times"], "best": best,
            "sizes": raw["sizes"], "targets": targets}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=256, help="sharded state per rank, MiB")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="32 MiB per rank, 2 rounds")
    ap.add_argument("--idle", type=float, default=0.0, help="seconds to wait before each save")
    ap.add_argument("--one-save-at-rest", action="store_true",
                    help="also time MettaStorageWriter(keep_previous=False): new files every save")
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: the temp directory)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    mib, rounds = (32, 2) if args.quick else (args.mib, args.rounds)
    doc = run(mib, rounds, args.dir, args.idle, args.one_save_at_rest)
    rows = []
    for name, b in doc["best"].items():
        ref = doc["best"]["torch FileSystem" if "durable" in name or name == "torch FileSystem"
                          else "torch FileSystem no fsync"]
        committed, at_rest = doc["sizes"][name]
        rows.append([name, f"{committed / MiB:.1f} MiB", f"{at_rest / MiB:.1f} MiB", f"{b['save'] * 1e3:.0f}",
                     f"{b['save + cleanup'] * 1e3:.0f}", f"{b['load'] * 1e3:.0f}",
                     f"{b['save'] / ref['save']:.2f}x", f"{b['load'] / ref['load']:.2f}x"])
    idle = f", {args.idle:g} s idle before each save" if args.idle else ""
    print(f"## Distributed checkpoint, {WORLD} ranks x {mib} MiB (Shard(0) DTensors), best of {rounds} rounds{idle}\n")
    print(markdown_table(["layer", "checkpoint size", "at rest", "save ms", "save + cleanup ms", "load ms",
                          "save vs torch (same fsync)", "load vs torch"], rows))
    for t in doc["targets"]:
        print(f"\n{t['target']}: {t['value_interleaved']:.2f}x (goal {t['goal']}: {'met' if t['met'] else 'not met'}; "
              f"{t['detail']})")
    if args.json:
        write_json(args.json, {"environment": environment(), **doc})
    return 0


if __name__ == "__main__":
    sys.exit(main())
