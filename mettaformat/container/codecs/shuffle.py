"""Byte-shuffle filter (frames of format 3.0 and 3.1 files): every byte plane of a chunk in one frame.

Float weights have highly redundant exponent bytes; grouping byte ``i`` of every element
together lets zstd see that redundancy. The plane filters of ``planes.py`` give each plane its own
frame instead; both split and join planes with the same functions.
"""

from __future__ import annotations

import torch

from mettaformat.container.codecs.planes import join_planes, split_planes

__all__ = ["shuffle", "unshuffle"]


def shuffle(data: torch.Tensor, width: int) -> torch.Tensor:
    """Byte planes of ``data`` (uint8, a multiple of ``width`` long): plane ``i`` holds byte ``i`` of each element."""
    return torch.from_numpy(split_planes(data, width, False).reshape(-1).copy())


def unshuffle(planes: torch.Tensor, out: torch.Tensor, width: int) -> None:
    """Inverse of :func:`shuffle`: write the interleaved bytes of ``planes`` into ``out`` (uint8)."""
    join_planes([[plane] for plane in planes.numpy().reshape(width, -1)], out, width, False)
