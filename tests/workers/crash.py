"""Savers for the crash-consistency tests, run in forkserver children (fast to start, torch preloaded)."""

from __future__ import annotations

import resource
import signal
import sys
from pathlib import Path
from typing import Any

import torch

import mettaformat


def version_tensors(version: int) -> dict[str, torch.Tensor]:
    # Several tensors of different sizes, each filled with the version: a mixed file is detectable.
    return {f"t{i}": torch.full((1 << (12 + i),), float(version)) for i in range(8)}


def save_loop(path: str, first_version: int, compression: str, durable: bool, saves: Any = None) -> None:
    """Save versions first_version, first_version + 1, ... to ``path`` until killed.

    ``saves`` (a shared integer, -1 at first) is set to 0 when the loop starts and counts finished saves,
    so the parent can time its kills from the child's progress rather than from the clock.
    """
    torch.set_num_threads(1)
    version = first_version
    if saves is not None:
        saves.value = 0
    while True:
        mettaformat.save_file(version_tensors(version), path, metadata={"version": version},
                              compression=compression, durable=durable)  # type: ignore[arg-type]
        version += 1
        if saves is not None:
            saves.value += 1


def save_with_file_size_limit(path: str, limit: int, result: str) -> None:
    """Save a file larger than ``limit`` under RLIMIT_FSIZE: writes fail like ENOSPC would."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        mettaformat.save_file(version_tensors(99), path, metadata={"version": 99})
    except mettaformat.MettaFormatError as e:
        Path(result).write_text(f"{type(e).__name__}: {e}")
        return
    Path(result).write_text("saved")


if __name__ == "__main__":
    save_loop(sys.argv[1], int(sys.argv[2]), sys.argv[3], False)
