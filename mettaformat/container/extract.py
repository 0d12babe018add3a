"""Extract a section's safetensors stream into a standalone ``.safetensors`` file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from mettaformat._atomic import atomic_fd
from mettaformat._files import refuse_overwriting_input
from mettaformat._torch import tensor_bytes
from mettaformat.container.codecs.base import pwrite_all
from mettaformat.container.reader import LazyCheckpoint
from mettaformat.errors import TensorNotFoundError

__all__ = ["ExtractReport", "extract_safetensors"]


@dataclass
class ExtractReport:
    """What an extraction wrote, and what a safetensors file cannot carry."""

    tensors: int
    bytes_written: int
    #: tied tensors stored once; safetensors has no aliases, so these names are absent from the
    #: file (they are listed in its ``__metadata__["mettaformat.aliases"]``).
    aliases: dict[str, str] = field(default_factory=dict)
    #: container metadata and trees are not part of the weights stream.
    dropped: list[str] = field(default_factory=list)


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
        header = ckpt.stream_header(section)
        with atomic_fd(target) as fd:
            pwrite_all(fd, header, 0)
            for t in entry.tensors:
                # one tensor in memory at a time (zstd) or a view of the mapping (raw)
                tensor = ckpt.read_entry(entry, t)
                pwrite_all(fd, tensor_bytes(tensor.reshape(-1).view(torch.uint8)), len(header) + t.begin)
            os.ftruncate(fd, entry.stream_length)
        dropped = []
        if ckpt.header.metadata:
            dropped.append("metadata")
        dropped += [f"tree {name!r}" for name in ckpt.header.trees]
        dropped += [f"section {s.name!r}" for s in ckpt.header.sections if s.name != section]
        aliases = dict(entry.aliases)

    return ExtractReport(
        tensors=len(entry.tensors), bytes_written=entry.stream_length, aliases=aliases, dropped=dropped
    )
