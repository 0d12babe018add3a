"""A standalone copy of a delta checkpoint: every tensor rebuilt, the base no longer needed."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mettaformat._atomic import atomic_fd
from mettaformat._files import refuse_overwriting_input
from mettaformat.container.chain import chain
from mettaformat.container.codecs import codec_class
from mettaformat.container.reader import LazyCheckpoint
from mettaformat.container.writer import _write
from mettaformat.errors import naming_file

__all__ = ["MaterializeReport", "materialize"]


@dataclass(frozen=True)
class MaterializeReport:
    #: the bases the source was rebuilt from, nearest first (empty: it was already standalone)
    chain: list[str]
    tensors: int
    bytes_written: int


def materialize(source: str | os.PathLike[str], output: str | os.PathLike[str]) -> MaterializeReport:
    """Write ``output``: ``source`` with every tensor rebuilt from its bases, metadata and trees kept, each
    section compressed with the codec and configuration it has in ``source``.

    Raises:
        WriteError: ``output`` is ``source`` or one of its bases (it would destroy what it reads).
        MettaFormatError: ``source`` or a base is missing, changed or damaged (as for :func:`open`).
    """
    with LazyCheckpoint(source) as ckpt, naming_file(source, container=True):
        bases = [str(c.path) for c in chain(ckpt)[1:]]
        refuse_overwriting_input(output, source, *bases, command="materialize")
        sections = {name: ckpt.load_section(name) for name in ckpt.sections}
        codecs = {s.name: codec_class(s.codec).from_configuration(dict(s.configuration)) for s in ckpt.header.sections}
        with atomic_fd(output) as fd:
            length = _write(fd, sections, ckpt.metadata, None, codecs, encoded_trees=dict(ckpt.header.trees))
    return MaterializeReport(bases, sum(len(s) for s in sections.values()), length)
