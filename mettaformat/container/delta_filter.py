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
    if target.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    d = np.subtract(_uint(target, width), _uint(base, width))  # wraps modulo 2^bits
    sign = np.right_shift(d, 8 * width - 1)
    np.negative(sign, out=sign)  # all ones where the difference is negative
    np.left_shift(d, 1, out=d)
    np.bitwise_xor(d, sign, out=d)
    return torch.from_numpy(d).view(torch.uint8)


def apply_residual(stored: torch.Tensor, base: torch.Tensor, width: int) -> torch.Tensor:
    """The bytes (uint8) of ``base + unzigzag(stored)``: the inverse of :func:`residual` (two passes over
    fresh memory, the rest in place: rebuilding is on the load path)."""
    if stored.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    z = _uint(stored, width)
    d = np.right_shift(z, 1)
    low = np.bitwise_and(z, 1)
    np.negative(low, out=low)
    np.bitwise_xor(d, low, out=d)
    np.add(d, _uint(base, width), out=d)
    return torch.from_numpy(d).view(torch.uint8)
