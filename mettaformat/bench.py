"""A quick, self-contained comparison of one state dict across formats (``mettaformat bench``, the demo).

The full benchmark suite (peers, datasets, charts) lives in ``benchmarks/`` in the repository.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["FormatResult", "compare_formats", "markdown_table"]


@dataclass(frozen=True)
class FormatResult:
    format: str
    size: int
    save_ms: float
    load_ms: float
    lazy_ms: float | None


def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _touch(sd: dict[str, torch.Tensor]) -> None:
    for t in sd.values():
        if t.numel():
            t.reshape(-1)[::1024].sum()  # one value per 4 KiB page of fp32: every page is read


def compare_formats(weights: dict[str, torch.Tensor], workdir: Path, *, repeat: int = 7) -> list[FormatResult]:
    """Save ``weights`` in each format under ``workdir`` and time save, full load (+touch) and lazy access.

    Timings are medians of ``repeat`` runs after a warm-up, with the files in the page cache.
    """
    import safetensors
    import safetensors.torch

    import mettaformat

    first = next(iter(weights))
    paths = {name: workdir / f"bench{suffix}" for name, suffix in (
        ("mettaformat raw", ".mfmt"), ("mettaformat zstd", ".zstd.mfmt"), ("safetensors", ".safetensors"),
        ("torch.save", ".pt"))}
    saves: dict[str, Callable[[], object]] = {
        "mettaformat raw": lambda: mettaformat.save_file(weights, paths["mettaformat raw"]),
        "mettaformat zstd": lambda: mettaformat.save_file(weights, paths["mettaformat zstd"], compression="zstd"),
        "safetensors": lambda: safetensors.torch.save_file(weights, paths["safetensors"]),
        "torch.save": lambda: torch.save(weights, paths["torch.save"]),
    }
    loads: dict[str, Callable[[], object]] = {
        "mettaformat raw": lambda: _touch(mettaformat.load_file(paths["mettaformat raw"])),
        "mettaformat zstd": lambda: _touch(mettaformat.load_file(paths["mettaformat zstd"])),
        "safetensors": lambda: _touch(safetensors.torch.load_file(paths["safetensors"])),
        "torch.save": lambda: _touch(torch.load(paths["torch.save"], weights_only=True)),
    }

    def lazy_mfmt() -> object:
        with mettaformat.open(paths["mettaformat raw"]) as f:
            return f.get_tensor(first)

    def lazy_st() -> object:
        with safetensors.safe_open(paths["safetensors"], "pt") as f:
            return f.get_tensor(first)

    lazy: dict[str, Callable[[], object]] = {
        "mettaformat raw": lazy_mfmt, "safetensors": lazy_st,
        "torch.save": lambda: torch.load(paths["torch.save"], mmap=True, weights_only=True)[first],
    }
    results = []
    for name, path in paths.items():
        save_ms = _median_ms(saves[name], max(1, repeat // 2))
        results.append(FormatResult(name, path.stat().st_size, save_ms, _median_ms(loads[name], repeat),
                                    _median_ms(lazy[name], repeat) if name in lazy else None))
    return results


def markdown_table(results: list[FormatResult], raw_bytes: int) -> str:
    lines = ["| format | size | size ratio | save | full load + touch | lazy open + one tensor |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lazy = f"{r.lazy_ms:.2f} ms" if r.lazy_ms is not None else "n/a (decodes)"
        lines.append(f"| {r.format} | {r.size / 2**20:.2f} MiB | {raw_bytes / r.size:.3f} | {r.save_ms:.1f} ms "
                     f"| {r.load_ms:.2f} ms | {lazy} |")
    return "\n".join(lines)
