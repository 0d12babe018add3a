"""``load_any`` over a URI: containers and safetensors by range, legacy pickles by one whole download.

The format is named from the first bytes, which the source's first range request already
holds, so sniffing costs nothing extra; the same source then serves the read.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from mettaformat._torch import buffer_tensor
from mettaformat.checkpoint import Checkpoint
from mettaformat.constants import MAX_STREAM_HEADER_SIZE
from mettaformat.dtypes import dtype_from_tag, itemsize
from mettaformat.errors import FormatError, MettaFormatError
from mettaformat.remote.source import RemoteSource

if TYPE_CHECKING:
    from mettaformat.anyformat import FormatName

__all__ = ["read_remote", "read_remote_source", "read_safetensors_remote", "sniff_remote"]

_SNIFF_BYTES = 64


def _sniff(source: RemoteSource) -> FormatName:
    from mettaformat.anyformat import format_of

    head = source.read(0, min(_SNIFF_BYTES, source.size), "signature")
    return format_of(head, source.size, source.name)


def sniff_remote(uri: str) -> FormatName:
    """The format of the object at ``uri`` (see :func:`mettaformat.anyformat.sniff_format`)."""
    return _sniff(RemoteSource(uri))


def read_remote(
    uri: str, *, device: str | torch.device = "cpu", lazy: bool = True
) -> tuple[Checkpoint, FormatName]:
    """``(checkpoint, format name)`` of the object at ``uri``.

    Raises:
        RemoteError subclasses naming the URI; FormatError, LegacyImportError, IntegrityError
        as for local files.
    """
    from mettaformat.checkpoint_io import read_checkpoint

    return read_remote_source(
        RemoteSource(uri), lazy=lazy, reader=lambda s: read_checkpoint(s, device=device, lazy=lazy)  # type: ignore[arg-type]
    )


def read_remote_source(
    source: RemoteSource, *, lazy: bool, reader: Callable[[RemoteSource], Checkpoint]
) -> tuple[Checkpoint, FormatName]:
    """Like :func:`read_remote` for an open source; ``reader`` reads a container."""
    kind = _sniff(source)
    if kind == "mettaformat":
        return reader(source), kind
    if kind == "safetensors":
        return read_safetensors_remote(source), kind
    from mettaformat.legacy import import_legacy_bytes

    data = bytearray(source.size)  # a pickle must be read whole; the download is parallel
    source.readinto(memoryview(data), 0, "file")
    return import_legacy_bytes(data), kind


def read_safetensors_remote(source: RemoteSource) -> Checkpoint:
    """A plain safetensors object: its header from the first range read, its data by parallel ranges
    into one buffer that the tensors view.

    Raises:
        FormatError: a malformed header, or offsets outside the object.
    """
    from mettaformat.anyformat import safetensors_checkpoint

    uri = source.name
    (n,) = struct.unpack("<Q", source.read(0, 8, "safetensors header"))
    if not 2 <= n <= min(MAX_STREAM_HEADER_SIZE, source.size - 8):
        raise FormatError(f"{uri}: invalid safetensors header length {n}", region="safetensors")
    try:
        header = json.loads(source.read(8, n, "safetensors header"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{uri}: invalid safetensors header: {e}", region="safetensors") from None
    if not isinstance(header, dict):
        raise FormatError(f"{uri}: safetensors header is not a JSON object", region="safetensors")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_length = 8 + n, source.size - 8 - n
    entries = []
    for name, info in header.items():
        try:
            tag, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            dtype = dtype_from_tag(tag)
            ok = all(isinstance(d, int) and d >= 0 for d in shape) and 0 <= begin <= end <= data_length
            ok = ok and end - begin == math.prod(shape) * itemsize(tag)
        except (KeyError, TypeError, ValueError, MettaFormatError):
            ok = False
        if not ok:
            raise FormatError(f"{uri}: invalid safetensors entry {name!r}", region="safetensors")
        entries.append((name, dtype, shape, begin, end))
    buffer = bytearray(data_length)
    source.readinto(memoryview(buffer), data_start, "safetensors data")
    tensors = {
        name: buffer_tensor(buffer, begin, end - begin, dtype, shape) for name, dtype, shape, begin, end in entries
    }
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{uri}: safetensors metadata must map strings to strings", region="safetensors")
    return safetensors_checkpoint(tensors, dict(metadata), where=uri)
