"""Lazy handles on an open container: a tensor read in part, a state dict read on access."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from mettaformat.container.header import SectionEntry, TensorEntry
from mettaformat.errors import TensorNotFoundError

if TYPE_CHECKING:
    from mettaformat.container.reader import LazyCheckpoint

__all__ = ["LazyStateDict", "TensorSlice"]


class TensorSlice:
    """Returned by :meth:`LazyCheckpoint.get_slice`; index it like a tensor."""

    def __init__(self, ckpt: LazyCheckpoint, section: SectionEntry, entry: TensorEntry) -> None:
        self._ckpt, self._section, self._entry = ckpt, section, entry

    def get_shape(self) -> list[int]:
        return list(self._entry.shape)

    def get_dtype(self) -> str:
        from mettaformat.container.chain import delta_names  # a residual is stored as an unsigned dtype

        stored = delta_names(self._ckpt, self._section.name).get(self._entry.name)
        return stored.dtype if stored is not None else self._entry.dtype

    def __getitem__(self, index: Any) -> torch.Tensor:
        ckpt = self._ckpt
        if ckpt._readers[self._section.name].zero_copy and ckpt._src.mappable:
            # Indexing a mapped view touches only the pages of the selected elements.
            ckpt._mapped()
            return ckpt._mapped_tensor(self._section, self._entry)[index].to(ckpt._device)
        return ckpt.get_tensor(self._entry.name, section=self._section.name)[index]


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only mapping that reads tensors on first access."""

    def __init__(self, ckpt: LazyCheckpoint, section: str) -> None:
        self._ckpt, self._section = ckpt, section
        self._names = ckpt.keys(section)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise TensorNotFoundError(name, region=f"section {self._section!r}")
        return self._ckpt.get_tensor(name, section=self._section)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names
