"""Byte-shuffle filter: split each element into byte planes before compression.

Float weights have highly redundant exponent bytes; grouping byte ``i`` of every element
together lets zstd see that redundancy. The copies are numpy strided copies, one per byte
plane: they run at 2 GB/s or more on one core and release the GIL, where torch's equivalent
copy ran at a third of that here and oversubscribed the cores with its own thread pool when
called from decode workers (docs/benchmarks.md, benchmarks/bench_components.py).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["shuffle", "unshuffle"]


def shuffle(data: torch.Tensor, width: int) -> torch.Tensor:
    """Byte planes of ``data`` (uint8, a multiple of ``width`` long): plane ``i`` holds byte ``i`` of each element."""
    elements = data.numpy().reshape(-1, width)
    planes = np.empty((width, elements.shape[0]), dtype=np.uint8)
    for i in range(width):
        planes[i] = elements[:, i]
    return torch.from_numpy(planes.reshape(-1))


def unshuffle(planes: torch.Tensor, out: torch.Tensor, width: int) -> None:
    """Inverse of :func:`shuffle`: write the interleaved bytes of ``planes`` into ``out`` (uint8)."""
    elements = out.numpy().reshape(-1, width)
    source = planes.numpy().reshape(width, -1)
    for i in range(width):
        elements[:, i] = source[i]
