"""Byte-shuffle filter: split each element into byte planes before compression.

Float weights have highly redundant exponent bytes; grouping byte ``i`` of every element
together lets zstd see that redundancy. One strided copy per byte plane runs at memory
speed in torch (about 4.6 GB/s here), against 0.5 GB/s for a transposing copy (BENCH.md).
"""

from __future__ import annotations

import torch

__all__ = ["shuffle", "unshuffle"]


def shuffle(data: torch.Tensor, width: int) -> torch.Tensor:
    """Byte planes of ``data`` (uint8, a multiple of ``width`` long): plane ``i`` holds byte ``i`` of each element."""
    elements = data.view(-1, width)
    planes = torch.empty((width, elements.shape[0]), dtype=torch.uint8)
    for i in range(width):
        planes[i].copy_(elements[:, i])
    return planes


def unshuffle(planes: torch.Tensor, out: torch.Tensor, width: int) -> None:
    """Inverse of :func:`shuffle`: write the interleaved bytes of ``planes`` into ``out`` (uint8)."""
    elements = out.view(-1, width)
    planes = planes.view(width, -1)
    for i in range(width):
        elements[:, i].copy_(planes[i])
