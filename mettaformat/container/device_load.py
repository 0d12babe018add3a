"""Loading a section straight onto an accelerator.

A CPU load followed by ``.to(device)`` holds the whole model in host memory and copies tensor by
tensor. Here the section's bytes travel in large units through a small ring of (pinned) host
buffers: worker threads read raw chunks with ``preadv`` or decode zstd frames into one slot while
the previous slots are copied to the device asynchronously, so disk or page-cache reads, decoding
and host-to-device copies overlap. The tensors are views into one device allocation where their
offsets suit their dtype (one device-side copy each otherwise); tied names share one tensor.

Host memory stays at the ring (``RING_SLOTS`` x ``CHUNK_BYTES``), except that a zstd tensor larger
than a slot is decoded into a buffer of its own size. Checksums are verified on the host buffers
in order, before each copy; with GPUDirect Storage (``kvikio``) the bytes never reach the host, so
that path is taken only for raw sections that need no verification.

Everything but the copy itself is device-independent: a :class:`Transport` allocates, stages and
copies. :class:`CudaTransport` uses pinned buffers, a side stream and events;
:class:`HostTransport` copies with plain ``copy_`` (or an injected function), which is how the
chunking, ordering and ring reuse are tested without a GPU.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import torch
import xxhash

from mettaformat._pool import shared_pool
from mettaformat._torch import tensor_bytes, writable_bytes
from mettaformat.container.header import SectionEntry, TensorEntry
from mettaformat.container.verify import _read_into
from mettaformat.dtypes import dtype_from_tag
from mettaformat.errors import LayoutError

if TYPE_CHECKING:
    from mettaformat.container.reader import LazyCheckpoint

__all__ = ["CHUNK_BYTES", "RING_SLOTS", "CudaTransport", "HostTransport", "Transport", "load_to_device",
           "off_host", "transport_for"]

#: Bytes per ring slot: large enough that per-copy overhead is negligible (a multiple of 4 KiB,
#: so raw reads stay page-aligned in the file).
CHUNK_BYTES: Final = 16 << 20
#: Slots in the ring: one being filled, one being copied, and slack for uneven units.
RING_SLOTS: Final = 4

#: A tensor to verify and what gives its digest once its bytes are in place.
_Check = tuple[TensorEntry, Callable[[], int]]


class Transport(Protocol):
    """How bytes reach a device: see :class:`CudaTransport` and :class:`HostTransport`."""

    device: torch.device

    def allocate(self, nbytes: int) -> torch.Tensor:
        """Uninitialised uint8 memory on the device."""

    def staging(self, nbytes: int) -> torch.Tensor:
        """A uint8 host buffer that copies to the device can start from (pinned for CUDA)."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        """Start copying host ``src`` into device ``dst``; return a token for :meth:`wait`."""

    def wait(self, token: Any) -> None:
        """Block until the copy of ``token`` no longer reads its host buffer."""

    def finish(self) -> None:
        """Block until every copy started has landed."""


class CudaTransport:
    """Pinned host buffers, copies on a side stream, one event per copy."""

    def __init__(self, device: torch.device) -> None:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]

    def allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def staging(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self.stream)
        return event

    def wait(self, token: Any) -> None:
        token.synchronize()

    def finish(self) -> None:
        self.stream.synchronize()


class HostTransport:
    """Plain host buffers and ``dst.copy_(src)``: any device torch can copy to, and the CPU in tests.

    Args:
        device: where the tensors end up.
        copy: replaces the copy (``copy(dst, src)`` returns a token that ``wait`` receives).
        wait: what waiting for a token does (nothing by default: plain copies are synchronous).
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        copy: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
        wait: Callable[[Any], None] | None = None,
        finish: Callable[[], None] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self._copy = copy
        self._wait = wait
        self._finish = finish

    def allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def staging(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        if self._copy is not None:
            return self._copy(dst, src)
        dst.copy_(src)
        return None

    def wait(self, token: Any) -> None:
        if self._wait is not None:
            self._wait(token)

    def finish(self) -> None:
        if self._finish is not None:
            self._finish()


def off_host(device: torch.device) -> bool:
    """Whether tensors for ``device`` take the pipelined path (every device but the CPU)."""
    return device.type != "cpu"


def transport_for(device: str | torch.device) -> Transport:
    device = torch.device(device)
    if device.type == "cuda":
        return CudaTransport(device)
    return HostTransport(device)


@dataclass(frozen=True)
class Unit:
    """Bytes staged and copied together: ``length`` bytes at ``target`` in the device allocation.

    ``source`` is the file offset of a raw unit; ``entries`` are the whole tensors of a zstd unit.
    """

    target: int
    length: int
    source: int = -1
    entries: tuple[TensorEntry, ...] = ()


def raw_units(data_offset: int, start: int, end: int, chunk: int) -> list[Unit]:
    """Chunks of the stream's data bytes [start, end) (``data_offset`` is where they begin in the
    file), cut at multiples of ``chunk`` in file offsets so that reads stay aligned."""
    units: list[Unit] = []
    position = start
    while position < end:
        file_position = data_offset + position
        stop = min(end, position + chunk - file_position % chunk)
        units.append(Unit(target=position - start, length=stop - position, source=file_position))
        position = stop
    return units


def packed_units(entries: Sequence[TensorEntry], start: int, chunk: int) -> list[Unit]:
    """Consecutive whole tensors grouped into units of at most ``chunk`` bytes (a larger tensor
    is a unit of its own)."""
    units: list[Unit] = []
    group: list[TensorEntry] = []

    def close() -> None:
        if group:
            begin = group[0].begin
            units.append(Unit(target=begin - start, length=group[-1].end - begin, entries=tuple(group)))
            group.clear()

    for entry in entries:
        if group and entry.end - group[0].begin > chunk:
            close()
        group.append(entry)
    close()
    return units


class _InOrderHashes:
    """Per-tensor xxh3 states fed with consecutive units of the device allocation, in order."""

    def __init__(self, entries: Sequence[TensorEntry], start: int) -> None:
        self.entries = sorted(entries, key=lambda e: e.begin)
        self.start = start
        self.states = [xxhash.xxh3_64() for _ in self.entries]
        self.next = 0

    def feed(self, target: int, data: memoryview) -> list[tuple[TensorEntry, int]]:
        """Hash the part of each tensor inside ``data`` (which lies at ``target``); return the
        (entry, digest) of the tensors that end inside it."""
        done: list[tuple[TensorEntry, int]] = []
        end = target + len(data)
        i = self.next
        while i < len(self.entries):
            entry = self.entries[i]
            lo, hi = max(entry.begin - self.start, target), min(entry.end - self.start, end)
            if lo > end or (lo == end and entry.nbytes):
                break
            if hi > lo:
                self.states[i].update(data[lo - target : hi - target])
            if entry.end - self.start <= end:
                done.append((entry, self.states[i].intdigest()))
                i += 1
            else:
                break
        self.next = i
        return done


def load_to_device(
    ckpt: LazyCheckpoint,
    section: SectionEntry,
    entries: Sequence[TensorEntry],
    transport: Transport,
    *,
    chunk: int = CHUNK_BYTES,
    slots: int = RING_SLOTS,
    gds: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Read ``entries`` of ``section`` onto ``transport.device``; return entry name to tensor.

    Args:
        gds: read raw sections with GPUDirect Storage (``kvikio``): None uses it when installed,
            the device is CUDA and no checksum needs checking.

    Raises:
        IntegrityError: a checksum differs (the copy of that tensor never started).
        LayoutError, CodecError: the file is damaged or changed size while open.
    """
    if not entries:
        return {}
    start = min(e.begin for e in entries)
    end = max(e.end for e in entries)
    device_bytes = transport.allocate(end - start)
    reader = ckpt.section_reader(section.name)
    unchecked = ckpt._unchecked(section, entries)
    if reader.zero_copy:
        data_offset = section.offset + section.stream_header_length
        if os.fstat(ckpt._fd).st_size != ckpt.file_size:
            raise LayoutError("file changed size while open", region="file")
        units = raw_units(data_offset, start, end, chunk)
        if not unchecked and _use_gds(gds, transport):
            _gds_read(ckpt, device_bytes, units)
        else:
            _pipeline(ckpt, section, units, device_bytes, transport, unchecked, start, chunk, slots)
    else:
        units = packed_units(sorted(entries, key=lambda e: e.begin), start, chunk)
        _pipeline(ckpt, section, units, device_bytes, transport, unchecked, start, chunk, slots)
    return {e.name: _view(device_bytes, e, start) for e in entries}


def _view(device_bytes: torch.Tensor, entry: TensorEntry, start: int) -> torch.Tensor:
    dtype = dtype_from_tag(entry.dtype)
    if not entry.nbytes:
        return torch.empty(entry.shape, dtype=dtype, device=device_bytes.device)
    part = device_bytes[entry.begin - start : entry.end - start]
    width = torch.empty((), dtype=dtype).element_size()
    if (entry.begin - start) % width:  # safetensors packs tensors without padding
        part = part.clone()
    return part.view(dtype).reshape(entry.shape)


def _pipeline(
    ckpt: LazyCheckpoint,
    section: SectionEntry,
    units: list[Unit],
    device_bytes: torch.Tensor,
    transport: Transport,
    unchecked: Sequence[TensorEntry],
    start: int,
    chunk: int,
    slots: int,
) -> None:
    """Fill host slots ahead (up to ``slots`` units in flight) and copy each, in order, once it
    is filled and verified; a slot is refilled only after its previous copy has read it."""
    if not units:  # only empty tensors
        return
    slot_bytes = min(chunk, max(u.length for u in units))  # a small load gets small slots
    ring = [transport.staging(slot_bytes) for _ in range(min(slots, len(units)))]
    tokens: list[Any] = [None] * len(ring)
    hashes = _InOrderHashes(unchecked, start) if unchecked and ckpt.section_reader(section.name).zero_copy else None
    pending: deque[tuple[Unit, int, torch.Tensor, list[Future[Any]], list[_Check]]] = deque()

    def issue() -> None:
        unit, slot, host, futures, checks = pending.popleft()
        for future in futures:
            future.result()
        if hashes is not None:
            checked = hashes.feed(unit.target, tensor_bytes(host))
        else:
            checked = [(entry, digest()) for entry, digest in checks]
        for entry, digest in checked:
            ckpt._check(entry, section, digest)  # raises, naming the tensor
        tokens[slot] = (transport.copy(device_bytes[unit.target : unit.target + unit.length], host), host)

    try:
        for i, unit in enumerate(units):
            if len(pending) == len(ring):
                issue()
            slot = i % len(ring)
            if tokens[slot] is not None:
                transport.wait(tokens[slot][0])
                tokens[slot] = None
            host = ring[slot][: unit.length] if unit.length <= slot_bytes else transport.staging(unit.length)
            futures, checks = _fill(ckpt, section, unit, host)
            pending.append((unit, slot, host, futures, checks))
        while pending:
            issue()
    finally:
        started = [future for *_, futures, _ in pending for future in futures]
        for future in started:
            future.cancel()
        wait(started)  # running reads and decodes use the ring and the file's mapping
        transport.finish()


def _fill(
    ckpt: LazyCheckpoint, section: SectionEntry, unit: Unit, host: torch.Tensor
) -> tuple[list[Future[Any]], list[_Check]]:
    """Start filling ``host`` with ``unit``: one read for raw, the frame decodes for zstd (each
    tensor hashed while it decodes, when it needs checking)."""
    pool = shared_pool()
    if unit.source >= 0:

        def read() -> None:
            if _read_into(ckpt._fd, writable_bytes(host), unit.source) != unit.length:
                raise LayoutError("file ended early", region=f"section {section.name!r}", offset=unit.source)

        return [pool.submit(read)], []
    reader = ckpt.section_reader(section.name)
    source = ckpt._mapped()
    futures: list[Future[Any]] = []
    checks: list[_Check] = []
    base = unit.entries[0].begin
    for entry in unit.entries:
        out = host[entry.begin - base : entry.end - base]
        tasks, digest = ckpt._decode_tasks(reader, source, section, entry, out)
        futures += [pool.submit(task) for task in tasks]
        if digest is not None:
            checks.append((entry, digest))
    return futures, checks


def _use_gds(gds: bool | None, transport: Transport) -> bool:
    if gds is False or (gds is None and transport.device.type != "cuda"):
        return False
    try:
        import kvikio  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        if gds:
            raise
        return False
    return True


def _gds_read(ckpt: LazyCheckpoint, device_bytes: torch.Tensor, units: list[Unit]) -> None:
    """Read raw units from the file straight into device memory (kvikio's ``CuFile.pread``; it
    falls back to its own host bounce buffers where GPUDirect Storage is unavailable)."""
    import kvikio

    with kvikio.CuFile(os.fspath(ckpt.path), "r") as f:
        futures = [
            (unit, f.pread(device_bytes[unit.target : unit.target + unit.length], unit.length, unit.source))
            for unit in units
        ]
        for unit, future in futures:
            if future.get() != unit.length:
                raise LayoutError("file ended early", region="file", offset=unit.source)
