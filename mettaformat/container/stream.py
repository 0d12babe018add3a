"""The safetensors byte stream a section holds: planning its layout and checking its header.

A stream is ``u64 N | N bytes of JSON | data``, exactly a ``.safetensors`` file. Tensors are
placed largest item size first, so that with the data region on a 64-byte boundary every
tensor starts on a multiple of its own item size (zero-copy views need no fix-up), and the
JSON is padded with spaces (as the safetensors spec allows) to put the data region there.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mettaformat._torch import storage_key
from mettaformat.constants import MAX_NAME_BYTES, RESERVED_NAMES, STREAM_DATA_ALIGNMENT
from mettaformat.container.header import SectionEntry, TensorEntry
from mettaformat.container.layout import align_offset
from mettaformat.container.stream_json import StreamTensor, parse_stream_json
from mettaformat.dtypes import itemsize, tag_from_dtype
from mettaformat.errors import HeaderError, LayoutError, WriteError

__all__ = ["PlannedTensor", "StreamPlan", "check_stream_header", "plan_stream"]


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    tensor: torch.Tensor
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class StreamPlan:
    """Where every tensor of a section goes, before any byte is written."""

    tensors: tuple[PlannedTensor, ...]  # in data order
    aliases: dict[str, str]
    order: tuple[str, ...]
    header: bytes  # the 8-byte length plus the padded JSON

    @property
    def data_length(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    @property
    def length(self) -> int:
        return len(self.header) + self.data_length


def _check_write_name(name: object) -> str:
    if (
        not isinstance(name, str)
        or not name
        or "\x00" in name
        or name in RESERVED_NAMES
        or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
    ):
        raise WriteError(
            f"invalid tensor name {name!r}: names are non-empty str without NUL, at most "
            f"{MAX_NAME_BYTES} bytes, and not {sorted(RESERVED_NAMES)}"
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise WriteError(f"tensor name {name!r} is not valid UTF-8") from None
    return name


def plan_stream(tensors: Mapping[str, torch.Tensor]) -> StreamPlan:
    """Lay out ``tensors`` as a safetensors stream. Tied tensors (same storage, same view) become aliases.

    Raises:
        WriteError: invalid names, or dtypes/layouts a safetensors stream cannot hold.
    """
    aliases: dict[str, str] = {}
    owners: dict[tuple[object, ...], str] = {}
    stored: list[tuple[str, torch.Tensor, str]] = []
    order: list[str] = []
    for name, t in tensors.items():
        order.append(_check_write_name(name))
        if not isinstance(t, torch.Tensor):
            raise WriteError(f"value for {name!r} is a {type(t).__name__}, not a torch.Tensor")
        key = storage_key(t)
        if key is not None and key in owners:
            aliases[name] = owners[key]
            continue
        if key is not None:
            owners[key] = name
        stored.append((name, t, tag_from_dtype(t.dtype, name=name)))
    # Stable sort: largest elements first keeps every tensor aligned to its item size.
    stored.sort(key=lambda item: -itemsize(item[2]))
    planned: list[PlannedTensor] = []
    position = 0
    for name, t, tag in stored:
        nbytes = t.numel() * itemsize(tag)
        planned.append(PlannedTensor(name, t, tag, tuple(t.shape), position, position + nbytes))
        position += nbytes
    return StreamPlan(tuple(planned), aliases, tuple(order), _stream_header(planned, aliases))


def _stream_header(planned: list[PlannedTensor], aliases: dict[str, str]) -> bytes:
    meta: dict[str, str] = {"format": "pt"}
    if aliases:
        # safetensors refuses shared data; record the ties so nothing is lost silently on extraction.
        meta["mettaformat.aliases"] = json.dumps(aliases, sort_keys=True)
    doc: dict[str, object] = {"__metadata__": meta}
    for p in planned:
        doc[p.name] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [p.begin, p.end]}
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    total = align_offset(8 + len(body), STREAM_DATA_ALIGNMENT)
    body += b" " * (total - 8 - len(body))
    return struct.pack("<Q", len(body)) + body


def entries_from_plan(plan: StreamPlan, checksums: Mapping[str, int]) -> tuple[TensorEntry, ...]:
    return tuple(
        TensorEntry(
            name=p.name, dtype=p.dtype, shape=p.shape, begin=p.begin, end=p.end, checksum=checksums.get(p.name, 0)
        )
        for p in plan.tensors
    )


def check_stream_header(section: SectionEntry, data: bytes | memoryview) -> None:
    """Check that a section's embedded safetensors header is one safetensors reads, and agrees with our index.

    Raises:
        LayoutError: the length prefix disagrees with the index.
        HeaderError: the JSON is not what safetensors accepts (strictly, §5.5), or names different
            tensors, dtypes, shapes or offsets.
    """
    region = f"section {section.name!r} safetensors header"
    (n,) = struct.unpack_from("<Q", data)
    if n + 8 != section.stream_header_length:
        raise LayoutError(f"safetensors header length {n} disagrees with the index", region=region)
    _, tensors = parse_stream_json(bytes(data[8 : 8 + n]), region=region)
    expected = {t.name: StreamTensor(t.dtype, t.shape, t.begin, t.end) for t in section.tensors}
    if tensors != expected:
        raise HeaderError("safetensors header disagrees with the section index", region=region)
