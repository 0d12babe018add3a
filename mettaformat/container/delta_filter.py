"""The ``zigzag-sub`` filter on tensors' bit patterns (see ``delta.py`` and ``spec/codecs/delta.md``)."""

from __future__ import annotations

from typing import Final

import numpy as np
import torch

__all__ = ["apply_residual", "residual"]

_UINT: Final = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _uint(data: torch.Tensor, width: int) -> np.ndarray:
    return data.reshape(-1).view(torch.uint8).numpy().view(_UINT[width])


def residual(target: torch.Tensor, base: torch.Tensor, width: int) -> torch.Tensor:
    """zigzag(target - base) of the bit patterns of two contiguous CPU tensors, as an unsigned tensor."""
    d = _uint(target, width) - _uint(base, width)  # wraps modulo 2^bits
    z = (d << 1) ^ (np.zeros_like(d) - (d >> (8 * width - 1)))
    return torch.from_numpy(z).view(torch.uint8)


def apply_residual(stored: torch.Tensor, base: torch.Tensor, width: int) -> torch.Tensor:
    """The bytes (uint8) of ``base + unzigzag(stored)``: the inverse of :func:`residual`."""
    z = _uint(stored, width)
    d = (z >> 1) ^ (np.zeros_like(z) - (z & 1))
    return torch.from_numpy(_uint(base, width) + d).view(torch.uint8)
