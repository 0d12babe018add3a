"""One function per parser: feed it bytes, accept only ``MettaFormatError`` as a failure mode."""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable

import torch

from mettaformat.errors import MettaFormatError

_TMP = "/dev/shm" if os.path.isdir("/dev/shm") else None


def container(data: bytes) -> None:
    """The whole reader: open, metadata, trees, full load with verification."""
    import mettaformat

    with tempfile.NamedTemporaryFile(suffix=".mfmt", dir=_TMP) as f:
        f.write(data)
        f.flush()
        try:
            with mettaformat.open(f.name) as ckpt:
                ckpt.metadata  # noqa: B018
                for name in ckpt.tree_names:
                    ckpt.tree(name)
                for section in ckpt.sections:
                    ckpt.load_section(section)
        except MettaFormatError:
            pass


def header(data: bytes) -> None:
    """The msgpack header parser and the object-tree decoder."""
    from mettaformat.container.header import parse_header, parse_index
    from mettaformat.container.tree import decode_tree

    for parse in (parse_header, parse_index):
        try:
            h = parse(data)
            decode_tree(h.metadata)
            for tree in h.trees.values():
                decode_tree(tree)
        except MettaFormatError:
            pass


def zstd_frame(data: bytes) -> None:
    """The zstd frame path. Byte 0 bit 0 selects the shuffle filter (on float32 elements), bytes 1-4
    give the raw size the index would declare, the rest is the frame."""
    from mettaformat.container.codecs.zstd import _ZstdSection
    from mettaformat.container.header import SectionEntry, TensorEntry

    if len(data) < 6:
        return
    shuffled = data[0] & 1
    width = 4 if shuffled else 1
    raw = max(width, (struct.unpack_from("<I", data, 1)[0] % (1 << 20)) // width * width)
    frame = data[5:]
    entry = TensorEntry(name="t", dtype="F32" if shuffled else "U8", shape=(raw // width,), begin=0, end=raw,
                        checksum=0)
    table = struct.pack("<QII", 64, 64, 0) + struct.pack("<QII", len(frame), raw, shuffled)
    section = SectionEntry.from_entries(name="s", offset=0, length=64 + len(frame), codec="zstd", configuration={},
                                        stream_length=64 + raw, stream_header_length=64, stream_header_checksum=0,
                                        tensors=(entry,), aliases={}, order=("t",), frames=table)
    try:
        reader = _ZstdSection(section)
        source = memoryview(bytes(64) + frame)
        out = torch.empty(raw, dtype=torch.uint8)
        for task in reader.decode_tasks(source, entry, out):
            task()
    except MettaFormatError:
        pass


def unpickler(data: bytes) -> None:
    """The restricted pickle VM, with no storages available."""
    from mettaformat.legacy.unpickler import unpickle

    try:
        unpickle(bytearray(data))
    except MettaFormatError:
        pass


def torch_zip(data: bytes) -> None:
    """The torch zip parser and everything behind it (pickle, storages, recognisers)."""
    from mettaformat.legacy import import_legacy_bytes

    try:
        import_legacy_bytes(data)
    except MettaFormatError:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "container": container, "header": header, "zstd_frame": zstd_frame, "unpickler": unpickler,
    "torch_zip": torch_zip,
}
