"""Torch-only helpers: raw byte views of tensors, tied-tensor detection, buffers as tensors.

Bytes are exposed through ctypes rather than ``Tensor.numpy()`` so that numpy stays optional.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Any, Final

import torch

from mettaformat.errors import WriteError

__all__ = ["buffer_tensor", "contiguous_cpu", "storage_key", "tensor_bytes", "writable_bytes"]


def contiguous_cpu(t: torch.Tensor, name: str) -> torch.Tensor:
    """A dense, contiguous, CPU copy-or-view of ``t`` with conj/neg bits resolved.

    Raises:
        WriteError: sparse, quantized, meta or other tensors without plain strided storage.
    """
    if not isinstance(t, torch.Tensor):
        raise WriteError(f"value for {name!r} is a {type(t).__name__}, not a torch.Tensor")
    if t.layout != torch.strided or t.is_quantized or t.is_meta or t.is_nested:
        raise WriteError(
            f"tensor {name!r} is {t.layout}{' quantized' if t.is_quantized else ''}"
            f"{' meta' if t.is_meta else ''}: only dense tensors can be stored"
        )
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.resolve_conj().resolve_neg()
    return t if t.is_contiguous() else t.contiguous()


def writable_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor. Keep ``t`` alive while it is used."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A read-only byte view of a contiguous CPU tensor. Keep ``t`` alive while it is used."""
    return writable_bytes(t).toreadonly()


def storage_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    """Identity of a tensor's exact view: equal keys mean the tensors are tied (same bytes, same view)."""
    if t.layout != torch.strided or t.is_meta or t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def buffer_tensor(buffer: Any, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor viewing ``nbytes`` of ``buffer`` at ``offset`` (zero-copy; keeps ``buffer`` alive)."""
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=offset)
    return raw.view(dtype).reshape(shape)


#: Buffers from this size up are asked for in 2 MiB pages (see ``fresh_bytes``): glibc's malloc maps
#: every block above 32 MiB afresh, and keeps and reuses smaller ones.
HUGE_PAGE_MIN: Final = 32 << 20


def fresh_bytes(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 tensor for a decoder to fill. Large ones are backed by transparent huge
    pages where the system allows it: malloc maps them afresh each time, and first writes to fresh
    4 KiB pages cost a page fault each (as much as the whole byte-plane join of a large checkpoint);
    2 MiB pages take 512 times fewer. Smaller ones come from torch's allocator, which reuses memory a
    previous load freed: mapping those afresh too made loading one checkpoint after another (the RL
    policy with Adam, 52 MB) 1.5x slower, the kernel zeroing pages it had just taken back."""
    if nbytes < HUGE_PAGE_MIN or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8)  # the tensor keeps the mapping alive
