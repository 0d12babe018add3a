"""Lazy, memory-mapped container reader.

Opening (:mod:`mettaformat.container.opened`) reads three small regions: the preamble, the
header and the trailer tail (a remote object reads the tail later, when something needs it, so
that opening costs one request). Nothing else is read until a tensor is asked for. All I/O goes through a byte source
(:mod:`mettaformat.container.source`): a local file, or a remote object read by range. Raw
sections come back as zero-copy views of a private (copy-on-write) mapping that lives as long
as any tensor views it; zstd sections decode only the frames of the requested tensor.
Whole sections load in :mod:`~mettaformat.container.section_load`, the whole-file structure
check is :mod:`~mettaformat.container.structure`, and slices and lazy state dicts are
:mod:`~mettaformat.container.lazy_views`.

The file size is checked at open and again before every mapped access, so a file truncated
under us raises :class:`LayoutError` instead of killing the process with SIGBUS (a hostile
process that shrinks the file *between* the check and the access can still do that; see
``docs/SECURITY.md``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from mettaformat._torch import buffer_tensor, fresh_bytes, tensor_bytes
from mettaformat.container.chain import delta_names, open_base, saved_tensors
from mettaformat.container.codecs import SectionReader, get_codec
from mettaformat.container.device_load import load_to_device, off_host, transport_for
from mettaformat.container.header import SectionEntry, TensorEntry
from mettaformat.container.layout import checksum
from mettaformat.container.lazy_views import LazyStateDict, TensorSlice
from mettaformat.container.opened import ContainerFile, names_file
from mettaformat.container.section_load import decode_all, load_section, read_copy, run_tasks, unmapped_ranges
from mettaformat.container.source import ByteSource, stored_ranges
from mettaformat.container.structure import check_structure
from mettaformat.container.tree import decode_tree
from mettaformat.container.verify import STRUCTURE, OrderedHasher, is_verified, mark_verified
from mettaformat.dtypes import dtype_from_tag
from mettaformat.errors import IntegrityError, TensorNotFoundError, naming_file

__all__ = ["LazyCheckpoint", "load", "load_file", "open"]

def open(path: str | os.PathLike[str], *, verify: bool = True) -> LazyCheckpoint:  # noqa: A001
    """Open a container lazily: only the preamble, header and trailer tail are read.

    Args:
        path: a ``.mfmt`` file, or a URI (``s3://``, ``gs://``, ``https://``...) read by range.
        verify: check each tensor's checksum when it is read (reads the whole tensor once).

    Returns:
        A :class:`LazyCheckpoint`, usable as a context manager.

    Raises:
        FormatError: not a container, an unsupported version, a malformed header or index.
        IntegrityError: the header checksum does not match.
        OSError: the file cannot be opened.

    Example:
        >>> with mettaformat.open("model.mfmt") as ckpt:
        ...     w = ckpt.get_tensor("fc.weight")
    """
    return LazyCheckpoint(path, verify=verify)


def load_file(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", *, verify: bool = True, mmap: bool = True
) -> dict[str, torch.Tensor]:
    """Load the model state dict of a container.

    Raw sections map zero-copy (``mmap=True``) or are read into fresh memory (``mmap=False``:
    the tensors then no longer depend on the file, which may change or disappear); zstd frames
    decode on all cores straight into their destination tensors. With ``verify`` every
    checksum and the file structure are checked.

    Raises:
        FormatError, IntegrityError: the file is malformed or damaged (the error names where).
    """
    with LazyCheckpoint(path, verify=verify) as ckpt:
        return ckpt.load_section("model", device=device, copy=not mmap)


def load(data: bytes, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load the model state dict from the bytes of a container (the inverse of :func:`mettaformat.save`)."""
    with tempfile.NamedTemporaryFile(suffix=".mfmt") as f:
        f.write(data)
        f.flush()
        return load_file(f.name, device)


class LazyCheckpoint(ContainerFile):
    """An open container. See :func:`open`."""

    def __init__(
        self, path: str | os.PathLike[str] | ByteSource, *, verify: bool = True, copy: bool = False
    ) -> None:
        super().__init__(path)
        self.verify = verify
        #: read raw tensors into fresh memory instead of mapping them (they then outlive the file);
        #: always so for sources that cannot be mapped
        self.copy = copy or not self._src.mappable
        self._device: torch.device = torch.device("cpu")
        #: the open base of a delta checkpoint (None for a standalone file)
        self.base: LazyCheckpoint | None = None
        try:
            with naming_file(self.path, container=True):
                self._readers: dict[str, SectionReader] = {
                    s.name: get_codec(s.codec, region=f"section {s.name!r}").open_section(s)
                    for s in self.header.sections
                }
                if self.header.delta is not None:
                    self.base = open_base(self)
        except BaseException:
            self._src.close()
            raise
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def close(self) -> None:
        """Release the file (and the bases of a delta). Tensors already returned stay valid."""
        super().close()
        if self.base is not None:
            self.base.close()

    @names_file
    def tree(self, name: str) -> Any:
        """Decode the object tree ``name``; its tensor references are loaded."""
        if name not in self.header.trees:
            raise TensorNotFoundError(name, region="trees")
        return decode_tree(
            self.header.trees[name], lambda sec, n: self.get_tensor(n, section=sec), path=f"header.trees.{name}"
        )

    @property
    def tree_names(self) -> tuple[str, ...]:
        return tuple(self.header.trees)

    def to(self, device: str | torch.device) -> LazyCheckpoint:
        """Place tensors read from now on on ``device``."""
        self._device = torch.device(device)
        return self

    # -- tensors -----------------------------------------------------------------------------
    def _entry(self, name: str, section: str) -> tuple[SectionEntry, TensorEntry]:
        s = self.header.section(section)
        if s is None:
            raise TensorNotFoundError(name, region=f"section {section!r} (no such section)")
        entry = s.index.get(name) if type(name) is str else None
        if entry is None:
            raise TensorNotFoundError(name, region=f"section {section!r}")
        return s, entry

    def _mapped(self) -> memoryview:
        view: memoryview = self._src.view()
        return view

    @names_file
    def get_tensor(self, name: str, *, section: str = "model") -> torch.Tensor:
        """Read one tensor (zero-copy for raw sections), verifying its checksum if ``verify``.

        Raises:
            TensorNotFoundError: no such tensor.
            IntegrityError: the stored bytes do not match their checksum.
            CodecError, LayoutError: the file is damaged or changed while open.
        """
        s, entry = self._entry(name, section)
        key = (s.name, entry.name)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if entry.name in delta_names(self, s.name):
            tensor = self._read(s, entry).to(self._device)
        elif off_host(self._device):
            tensor = load_to_device(self, s, (entry,), transport_for(self._device))[entry.name]
        else:
            tensor = self._read(s, entry)
        self._cache[key] = tensor
        return tensor

    def _read_logical(self, name: str, section: str) -> torch.Tensor:
        """One tensor as saved (rebuilt from the base for a delta), uncached: what a delta on this file reads."""
        with naming_file(self.path, container=True):
            return self._read(*self._entry(name, section))

    def _read(self, s: SectionEntry, entry: TensorEntry) -> torch.Tensor:
        if entry.name in delta_names(self, s.name):
            return saved_tensors(self, s, [entry])[entry.name]
        return self._read_stored(s, entry)

    def _read_stored(self, s: SectionEntry, entry: TensorEntry) -> torch.Tensor:
        source = self._mapped()
        reader = self._readers[s.name]
        dtype = dtype_from_tag(entry.dtype)
        if reader.zero_copy and self.copy:
            return read_copy(self, s, entries=(entry,))[entry.name]
        if reader.zero_copy:
            if self._needs_check(s, entry):
                view = reader.view(source, entry)
                self._check(entry, s, checksum(view), view)
            return self._mapped_tensor(s, entry, source.obj)
        out = fresh_bytes(entry.nbytes)
        tasks, digest = self._decode_tasks(reader, source, s, entry, out)
        with self._src.holding(stored_ranges(reader, entry)):  # remote: all its frames in one request
            run_tasks(tasks)
        if digest is not None:
            self._check(entry, s, digest(), out)
        return out.view(dtype).reshape(entry.shape) if entry.nbytes else torch.empty(entry.shape, dtype=dtype)

    def _mapped_tensor(self, s: SectionEntry, entry: TensorEntry, owner: Any = None) -> torch.Tensor:
        """A zero-copy view of a raw tensor (the mapping exists: :meth:`_mapped` was called), in
        ``owner`` (the mapping, where the caller holds it already)."""
        return buffer_tensor(
            self._src.owner() if owner is None else owner,
            s.offset + s.stream_header_length + entry.begin,
            entry.nbytes,
            dtype_from_tag(entry.dtype),
            entry.shape,
        )

    def _needs_check(self, s: SectionEntry, entry: TensorEntry) -> bool:
        """Verifying, and this tensor of this very file was not verified before in this process."""
        return bool(self._unchecked(s, (entry,)))

    def _unchecked(self, s: SectionEntry, entries: Sequence[TensorEntry]) -> list[TensorEntry]:
        """The ``entries`` to verify: all of them unless verified before in this process while the
        file is unchanged (its identity is read once for all of them)."""
        if not self.verify:
            return []
        if not entries or self._src.identity() != self._identity:
            return list(entries)
        return [e for e in entries if not is_verified(self._identity, (s.name, e.name))]

    def _verified_before(self, key: tuple[str, str]) -> bool:
        """``key`` of this very file was verified before in this process (a file changed in place
        since it was opened is checked again)."""
        return is_verified(self._identity, key) and self._src.identity() == self._identity

    def _check(self, entry: TensorEntry, s: SectionEntry, digest: int, data: Any = None) -> None:
        """Raise unless ``digest`` is the tensor's checksum and, given its bytes, a BOOL tensor
        holds only 0 and 1 (torch's behaviour on any other byte is undefined, §6)."""
        if digest != entry.checksum:
            raise IntegrityError(
                f"checksum mismatch in tensor {entry.name!r}",
                region=f"section {s.name!r}",
                offset=s.offset + s.stream_header_length + entry.begin if self._readers[s.name].zero_copy else None,
            )
        if entry.dtype == "BOOL" and entry.nbytes and data is not None and _max_byte(data) > 1:
            raise IntegrityError(f"BOOL tensor {entry.name!r} holds a byte other than 0 or 1",
                                 region=f"section {s.name!r}")
        mark_verified(self._identity, [(s.name, entry.name)])

    def _check_all(
        self, s: SectionEntry, entries: list[TensorEntry], digests: list[int], datas: list[Any]
    ) -> None:
        for entry, digest, data in zip(entries, digests, datas, strict=True):
            if digest != entry.checksum or entry.dtype == "BOOL":
                self._check(entry, s, digest, data)  # raises, naming the tensor
        mark_verified(self._identity, [(s.name, e.name) for e in entries])

    def _decode_tasks(
        self, reader: SectionReader, source: memoryview, s: SectionEntry, entry: TensorEntry, out: torch.Tensor
    ) -> tuple[list[Callable[[], None]], Callable[[], int] | None]:
        """The decode jobs of one tensor and, when verifying, what gives its digest once they ran.
        Each decoded piece is hashed while still in the CPU cache when the reader tells the pieces'
        lengths (``piece_lengths``, one per job); otherwise the tensor is hashed afterwards."""
        tasks = reader.decode_tasks(source, entry, out)
        if not self._needs_check(s, entry):
            return tasks, None
        lengths = getattr(reader, "piece_lengths", None)
        pieces = lengths(entry) if lengths is not None else None
        if pieces is None or len(pieces) != len(tasks) or sum(pieces) != entry.nbytes:
            return tasks, lambda: checksum(tensor_bytes(out))
        hasher = OrderedHasher(tensor_bytes(out), pieces)
        return hasher.wrap(tasks), hasher.intdigest

    def section_reader(self, section: str) -> SectionReader:
        """The codec reader of ``section`` (frame tables, zero-copy views) for tools such as repair.

        Raises:
            TensorNotFoundError: no such section.
        """
        if section not in self._readers:
            raise TensorNotFoundError(section, region="sections")
        return self._readers[section]

    @names_file
    def read_entry(self, section: SectionEntry, entry: TensorEntry) -> torch.Tensor:
        """Read one tensor entry of ``section`` (uncached; checksum verified if ``verify``)."""
        return self._read(section, entry)

    @names_file
    def stream_header(self, section: str) -> bytes:
        """The safetensors header bytes of ``section``'s stream (decoded for zstd sections)."""
        return self.section_reader(section).stream_header(self._mapped())

    def get_slice(self, name: str, *, section: str = "model") -> TensorSlice:
        """A handle whose ``[...]`` reads part of a tensor (only the pages touched, for raw sections)."""
        s, entry = self._entry(name, section)
        return TensorSlice(self, s, entry)

    def state_dict(self, section: str = "model") -> LazyStateDict:
        """A mapping of ``section``'s tensors that reads each one on first access."""
        return LazyStateDict(self, section)

    @names_file
    def load_section(
        self, section: str = "model", device: str | torch.device = "cpu", *, copy: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """Read every tensor of ``section`` (decoding frames on all cores); verify the structure too.

        ``copy=True`` reads raw sections into fresh memory instead of mapping them (default: as
        the checkpoint was opened).
        """
        return load_section(self, section, device, copy)

    # whole-section reads that delta rebuilds use too (see section_load)
    def _read_copy(self, s: SectionEntry, entries: tuple[TensorEntry, ...] | None = None) -> dict[str, torch.Tensor]:
        return read_copy(self, s, entries)

    def _decode_all(self, s: SectionEntry, entries: list[TensorEntry] | None = None) -> dict[str, torch.Tensor]:
        return decode_all(self, s, entries)

    def _unmapped_ranges(self) -> list[tuple[int, int]]:
        return unmapped_ranges(self)

    # -- whole-file checks -------------------------------------------------------------------
    @names_file
    def verify_structure(self) -> None:
        """Check what open does not read: padding, the trailer index, each embedded safetensors header.

        Raises:
            LayoutError, IntegrityError, HeaderError: naming the damaged region.
        """
        check_structure(self)
        mark_verified(self._identity, [STRUCTURE])

    def _verify_structure_once(self) -> None:
        """What a verifying load checks of the structure: all of it, unless this very file (unchanged)
        passed the check before in this process."""
        if self.verify and not self._verified_before(STRUCTURE):
            self.verify_structure()



def _max_byte(data: Any) -> int:
    """The largest byte of a buffer or a uint8 tensor."""
    if isinstance(data, torch.Tensor):
        return int(data.max())
    return int(np.frombuffer(data, np.uint8).max())
