"""``repair``: recover what is recoverable from a damaged container into a new, valid file.

Recovery never trusts the damaged file further than its checksums allow:

- the index comes from the header, or from the trailer's copy when the header is damaged
  (then metadata and trees are lost, and the report says so);
- every tensor is checked against its checksum; a tensor whose bytes are missing (truncated
  file) or damaged is dropped, or zero-filled with ``zero=True``;
- trees whose tensors were lost are dropped;
- memory stays proportional to the input: a tensor is decoded only when all its stored bytes
  are in the file (the codec's frame checks then bound its size, as for ``load_file``), and a
  zero-filled stand-in is never larger than the file.

The input is never modified and never overwritten.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mettaformat._files import read_regular, refuse_overwriting_input
from mettaformat._torch import tensor_bytes
from mettaformat.constants import PREAMBLE_SIZE, TRAILER_TAIL_SIZE
from mettaformat.container.codecs import get_codec
from mettaformat.container.header import Header, SectionEntry, TensorEntry, parse_header, parse_index
from mettaformat.container.layout import Preamble, TrailerTail, checksum
from mettaformat.container.tree import decode_tree
from mettaformat.container.writer import write_container
from mettaformat.dtypes import dtype_from_tag
from mettaformat.errors import FormatError, MettaFormatError, naming_file

__all__ = ["RepairReport", "repair"]


@dataclass
class RepairReport:
    source: str
    output: str
    index_from: str = "header"
    recovered: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    zero_filled: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _index(data: bytes) -> tuple[Header, str, list[str]]:
    """The section index, from the header if intact, else from the trailer."""
    notes: list[str] = []
    try:
        preamble = Preamble.unpack(data[:PREAMBLE_SIZE], max(len(data), PREAMBLE_SIZE + TRAILER_TAIL_SIZE))
        header_bytes = data[PREAMBLE_SIZE : PREAMBLE_SIZE + preamble.header_length]
        if len(header_bytes) != preamble.header_length or checksum(header_bytes) != preamble.header_checksum:
            raise FormatError("header checksum mismatch", region="header")
        header = parse_header(header_bytes)
        if header.file_length != len(data):
            notes.append(f"file is {len(data)} bytes, the header expects {header.file_length}")
        return header, "header", notes
    except MettaFormatError as e:
        notes.append(f"header unusable ({e}); using the trailer's copy of the index")
    try:
        tail = TrailerTail.unpack(data[-TRAILER_TAIL_SIZE:], len(data))
        index = data[tail.index_offset : tail.index_offset + tail.index_length]
        tail.verify_index(index)
        notes.append("metadata and object trees were in the damaged header and are lost")
        return parse_index(index), "trailer", notes
    except MettaFormatError as e:
        raise FormatError(
            f"nothing recoverable: neither the header nor the trailer index is intact ({e})", region="file"
        ) from e


def _recover_tensor(data: memoryview, section: SectionEntry, entry: TensorEntry) -> torch.Tensor:
    reader = get_codec(section.codec, region=f"section {section.name!r}").open_section(section)
    dtype = dtype_from_tag(entry.dtype)
    # Checked before anything is allocated: the sizes come from a damaged file. Stored bytes
    # present in the file bound the decoded size (the codec's frame checks bound the ratio).
    if reader.stored_end(entry) > len(data):
        raise FormatError("bytes missing (file truncated)", region=f"tensor {entry.name!r}")
    out = torch.empty(entry.nbytes, dtype=torch.uint8)
    if reader.zero_copy:
        if entry.nbytes:
            out.copy_(torch.frombuffer(bytearray(reader.view(data, entry)), dtype=torch.uint8))
    else:
        for task in reader.decode_tasks(data, entry, out):
            task()
    if checksum(tensor_bytes(out)) != entry.checksum:
        raise FormatError("checksum mismatch", region=f"tensor {entry.name!r}")
    return out.view(dtype).reshape(entry.shape) if entry.nbytes else torch.empty(entry.shape, dtype=dtype)


def repair(source: str | os.PathLike[str], output: str | os.PathLike[str], *, zero: bool = False) -> RepairReport:
    """Write what can be recovered from ``source`` to ``output``.

    Raises:
        WriteError: ``output`` is the input file.
        FormatError: nothing can be recovered (no intact index).
    """
    src, out = Path(source), Path(output)
    refuse_overwriting_input(out, src, command="repair")
    with naming_file(src):
        data = bytes(read_regular(src))
        header, index_from, notes = _index(data)
    report = RepairReport(source=str(src), output=str(out), index_from=index_from, notes=notes)
    view = memoryview(data)
    sections: dict[str, dict[str, torch.Tensor]] = {}
    for s in header.sections:
        tensors: dict[str, torch.Tensor] = {}
        try:
            get_codec(s.codec).open_section(s)
        except MettaFormatError as e:
            report.notes.append(f"section {s.name!r} unusable: {e}")
            report.lost += [f"{s.name}:{n}" for n in s.order]
            continue
        for entry in s.tensors:
            label = f"{s.name}:{entry.name}"
            try:
                tensors[entry.name] = _recover_tensor(view, s, entry)
                report.recovered.append(label)
            except MettaFormatError:
                if zero and entry.nbytes <= len(data):
                    tensors[entry.name] = torch.zeros(entry.shape, dtype=dtype_from_tag(entry.dtype))
                    report.zero_filled.append(label)
                else:
                    report.lost.append(label)
                    if zero:
                        report.notes.append(f"{label}: declares {entry.nbytes} bytes, more than the file holds")
        for alias, target in s.aliases.items():
            if target in tensors:
                tensors[alias] = tensors[target]
        sections[s.name] = {n: tensors[n] for n in s.order if n in tensors}
    trees: dict[str, Any] = {}
    for name, encoded in header.trees.items():
        try:
            trees[name] = decode_tree(encoded, lambda sec, n: sections[sec][n], path=f"trees.{name}")
        except (KeyError, MettaFormatError):
            report.notes.append(f"tree {name!r} lost (it refers to lost tensors or is damaged)")
    tree_sections = {k: v for k, v in sections.items() if k not in trees}
    try:
        metadata = decode_tree(header.metadata, path="metadata") if header.metadata is not None else {}
    except MettaFormatError as e:
        metadata = {}
        report.notes.append(f"metadata lost: {e}")
    codec = {s.codec for s in header.sections}
    write_container(
        out,
        tree_sections,
        metadata=metadata if isinstance(metadata, dict) else {},
        trees=trees,
        compression="zstd" if codec == {"zstd"} else "raw",
    )
    return report
