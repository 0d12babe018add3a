"""The ``zigzag-sub`` filter on tensors' bit patterns (see ``delta.py`` and ``spec/codecs/delta.md``)."""

from __future__ import annotations

import threading
from typing import Final

import numpy as np
import torch
import xxhash

__all__ = ["apply_residual", "apply_residual_in_place", "residual"]

_UINT: Final = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
#: Elements rebuilt per step: a block of residual, base and scratch stays in the CPU cache across the
#: five passes and the hash (measured 2.7x faster than whole-tensor passes over fresh memory).
_BLOCK_BYTES: Final = 128 << 10

_local = threading.local()


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


def _scratch(width: int) -> np.ndarray:
    buf: np.ndarray | None = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = np.empty(_BLOCK_BYTES, dtype=np.uint8)
    return buf.view(_UINT[width])


def apply_residual_in_place(stored: torch.Tensor, base: torch.Tensor, width: int, *, digest: bool = False
                            ) -> int | None:
    """Turn ``stored`` (contiguous uint8 bytes of a residual, overwritten) into ``base + unzigzag(stored)``,
    block by block while each block is in the CPU cache; with ``digest``, return the checksum of the result."""
    hasher = xxhash.xxh3_64() if digest else None
    if stored.numel():
        z = _uint(stored, width)
        b = _uint(base.contiguous(), width)
        low_all = _scratch(width)
        step = len(low_all)
        for i in range(0, len(z), step):
            zz, bb = z[i : i + step], b[i : i + step]
            low = low_all[: len(zz)]
            np.bitwise_and(zz, 1, out=low)
            np.negative(low, out=low)  # all ones where the difference is negative
            np.right_shift(zz, 1, out=zz)
            np.bitwise_xor(zz, low, out=zz)
            np.add(zz, bb, out=zz)  # wraps modulo 2^bits
            if hasher is not None:
                hasher.update(zz.data.cast("B"))
    return hasher.intdigest() if hasher is not None else None


def apply_residual(stored: torch.Tensor, base: torch.Tensor, width: int) -> torch.Tensor:
    """The bytes (uint8) of ``base + unzigzag(stored)``: the inverse of :func:`residual` (``stored`` is kept)."""
    out = stored.reshape(-1).view(torch.uint8).clone()
    apply_residual_in_place(out, base, width)
    return out
