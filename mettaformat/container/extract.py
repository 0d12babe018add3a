"""Extract a section's safetensors stream into a standalone ``.safetensors`` file.

The tensor bytes are copied as stored; the stream's JSON header gains the container's user
metadata in ``__metadata__``, encoded as ``convert --to safetensors`` does.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from mettaformat._atomic import atomic_fd
from mettaformat._files import refuse_overwriting_input
from mettaformat._torch import tensor_bytes
from mettaformat.checkpoint_io import split_metadata
from mettaformat.container.codecs.base import pwrite_all
from mettaformat.container.reader import LazyCheckpoint
from mettaformat.errors import TensorNotFoundError
from mettaformat.legacy.export_plain import add_safetensors_metadata

__all__ = ["ExtractReport", "extract_safetensors"]


@dataclass
class ExtractReport:
    """What an extraction wrote, and what a safetensors file cannot carry."""

    tensors: int
    bytes_written: int
    #: tied tensors stored once; safetensors has no aliases, so these names are absent from the
    #: file (they are listed in its ``__metadata__["mettaformat.aliases"]``).
    aliases: dict[str, str] = field(default_factory=dict)
    #: what the file does not carry: trees, other sections, metadata values with no string form.
    dropped: list[str] = field(default_factory=list)
    #: how carried metadata was encoded (JSON-encoded values).
    notes: list[str] = field(default_factory=list)


def _with_metadata(stream_header: bytes, metadata: dict[str, Any], dropped: list[str], notes: list[str]) -> bytes:
    """The stream header with ``metadata`` added to ``__metadata__`` (padded to 8 bytes, as safetensors does)."""
    if not metadata:
        return stream_header  # nothing to add: the stored stream, byte for byte
    (n,) = struct.unpack_from("<Q", stream_header)
    header = json.loads(stream_header[8 : 8 + n])
    carried: dict[str, str] = dict(header.get("__metadata__") or {})
    add_safetensors_metadata(carried, metadata, dropped, notes)
    if carried:
        header["__metadata__"] = carried
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def extract_safetensors(
    source: str | os.PathLike[str], target: str | os.PathLike[str], *, section: str = "model"
) -> ExtractReport:
    """Write ``section`` of ``source`` as a ``.safetensors`` file, tensor by tensor.

    Every checksum is verified on the way; the target is replaced atomically.

    Raises:
        TensorNotFoundError: no such section.
        FormatError, IntegrityError: the source is damaged.
        WriteError: the target cannot be written.
    """
    refuse_overwriting_input(target, source, command="extract")
    with LazyCheckpoint(source, verify=True) as ckpt:
        entry = ckpt.header.section(section)
        if entry is None:
            raise TensorNotFoundError(
                section, region=f"sections (no section named {section!r}; the file has {', '.join(ckpt.sections)})"
            )
        ckpt.verify_structure()
        dropped: list[str] = []
        notes: list[str] = []
        user, _ = split_metadata(ckpt.metadata)
        header = _with_metadata(ckpt.stream_header(section), user, dropped, notes)
        with atomic_fd(target) as fd:
            pwrite_all(fd, header, 0)
            for t in entry.tensors:
                # one tensor in memory at a time (zstd) or a view of the mapping (raw)
                tensor = ckpt.read_entry(entry, t)
                pwrite_all(fd, tensor_bytes(tensor.reshape(-1).view(torch.uint8)), len(header) + t.begin)
            size = len(header) + entry.stream_length - entry.stream_header_length
            os.ftruncate(fd, size)
        dropped += [f"tree {name!r}" for name in ckpt.header.trees]
        dropped += [f"section {s.name!r}" for s in ckpt.header.sections if s.name != section]
        aliases = dict(entry.aliases)

    return ExtractReport(tensors=len(entry.tensors), bytes_written=size, aliases=aliases, dropped=dropped, notes=notes)
