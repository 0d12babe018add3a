"""Craft hostile containers from valid ones, so that exactly the intended check fires.

:func:`parse` splits a valid file's bytes into editable parts: the preamble fields, the
decoded header dict, the decoded trailer index dict and each section's stored bytes (kept at
its file offset). A test edits any of those, then :func:`build` re-encodes the file:

- the header is re-encoded (or replaced by ``header_bytes``) and the preamble's length and
  checksum are recomputed, so a header edit is never caught as a checksum mismatch;
- sections stay at their offsets (a header too big for the space before the first section
  moves every section, and its ``offset`` field, by whole pages);
- the trailer index is rebuilt from the header (``sync_index``) and its checksum, length and
  the file length (in header, index and tail) are recomputed (``fix_file_length``);
- any single field can be forced to a chosen value through keyword overrides.

zstd helpers make real frames and splice them into a section, rewriting its frame table
(``<QII``: compressed length, raw length, filter) and length.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash
import zstandard

PREAMBLE = struct.Struct("<8sHHIQQ")
TAIL = struct.Struct("<QQQ8s")
FRAME = struct.Struct("<QII")
MAGIC = b"\x89MFT\r\n\x1a\n"
END_MAGIC = b"MFTEND\r\n"
PAGE = 4096
ZSTD_MAGIC = 0xFD2FB528


def xxh(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


def pack(value: Any) -> bytes:
    """Encode like the writer does (bin type for bytes, insertion order kept)."""
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


@dataclass
class Parts:
    major: int
    minor: int
    flags: int
    header: dict[str, Any]
    index: dict[str, Any]
    #: [file offset, stored bytes] of each section, in header order
    blobs: list[list[Any]]

    def section(self, i: int = 0) -> dict[str, Any]:
        return self.header["sections"][i]  # type: ignore[no-any-return]

    def tensor(self, name: str, i: int = 0) -> dict[str, Any]:
        for t in self.section(i)["tensors"]:
            if t["name"] == name:
                return t  # type: ignore[no-any-return]
        raise KeyError(name)

    def tensor_span(self, name: str, i: int = 0) -> tuple[int, int]:
        """[start, end) of a raw tensor's bytes inside blob ``i``."""
        begin, end = self.tensor(name, i)["offsets"]
        hl = self.section(i)["stream"]["header_length"]
        return hl + begin, hl + end

    # -- zstd frames -------------------------------------------------------------------------
    def frames(self, i: int = 0) -> list[tuple[bytes, int, int]]:
        """(frame bytes, raw length, filter) of every frame of zstd section ``i``."""
        blob = bytes(self.blobs[i][1])
        out, pos = [], 0
        for clen, rlen, flt in FRAME.iter_unpack(self.section(i)["frames"]):
            out.append((blob[pos : pos + clen], rlen, flt))
            pos += clen
        return out

    def set_frames(self, frames: list[tuple[bytes, int, int]], i: int = 0) -> None:
        """Replace section ``i``'s frames; the table and the section length follow."""
        blob = b"".join(f for f, _, _ in frames)
        self.blobs[i][1] = bytearray(blob)
        self.section(i)["frames"] = b"".join(FRAME.pack(len(f), r, flt) for f, r, flt in frames)
        self.section(i)["length"] = len(blob)

    def tensor_frame_indices(self, name: str, i: int = 0) -> list[int]:
        """Indices (in :meth:`frames`) of the frames holding tensor ``name`` (data order)."""
        s = self.section(i)
        ordered = sorted((t for t in s["tensors"] if "alias" not in t), key=lambda t: t["offsets"][0])
        frames = self.frames(i)
        index, out = 1, {}
        for t in ordered:
            nbytes, covered, first = t["offsets"][1] - t["offsets"][0], 0, index
            while covered < nbytes:
                covered += frames[index][1]
                index += 1
            out[t["name"]] = list(range(first, index))
        return out[name]


def to_entries(value: dict[str, Any]) -> dict[str, Any]:
    """A header or index with every columnar section index turned into the 3.0 per-tensor form,
    which is easier to edit one field at a time; the reader applies the same rules to both."""
    from mettaformat.container.tensor_index import section_to_entries_form

    for s in value.get("sections", []):
        if isinstance(s, dict):
            section_to_entries_form(s)
    if value.get("must_understand") == ["mettaformat.columnar_index"]:
        del value["must_understand"]
    return value


def parse(data: bytes) -> Parts:
    magic, major, minor, flags, hl, _ = PREAMBLE.unpack_from(data)
    assert magic == MAGIC
    header = to_entries(unpack(data[32 : 32 + hl]))
    il, _, _, end = TAIL.unpack_from(data, len(data) - 32)
    assert end == END_MAGIC
    index = to_entries(unpack(data[len(data) - 32 - il : len(data) - 32]))
    blobs = [[s["offset"], bytearray(data[s["offset"] : s["offset"] + s["length"]])] for s in header["sections"]]
    # The per-tensor form makes the index longer: fix the file length a rebuild will have.
    data_end = len(data) - 32 - il
    for _ in range(3):
        header["file_length"] = index["file_length"] = data_end + len(pack(index)) + 32
    return Parts(major, minor, flags, header, index, blobs)


def _copy(value: Any) -> Any:
    """A deep copy of a msgpack-able value (much faster than copy.deepcopy on big headers)."""
    return unpack(pack(value))


def _index_from(header: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy(header[k]) for k in ("file_length", "checksum", "sections") if k in header}


def build(
    parts: Parts,
    *,
    sync_index: bool = True,
    fix_file_length: bool = True,
    header_bytes: bytes | None = None,
    index_bytes: bytes | None = None,
    magic: bytes = MAGIC,
    major: int | None = None,
    minor: int | None = None,
    flags: int | None = None,
    header_length: int | None = None,
    header_checksum: int | None = None,
    index_length: int | None = None,
    index_checksum: int | None = None,
    tail_file_length: int | None = None,
    end_magic: bytes = END_MAGIC,
    gap: bytes = b"",
    trailing: bytes = b"",
) -> bytes:
    """Re-encode ``parts`` (see the module docstring). Overrides win over computed values."""
    header = _copy(parts.header)
    blobs = [[off, bytes(b)] for off, b in parts.blobs]
    index = _copy(parts.index)
    for _ in range(8):
        hb = header_bytes if header_bytes is not None else pack(header)
        first = min((off for off, _ in blobs), default=None)
        if first is not None and 32 + len(hb) > first:
            # Move every section (and its recorded offset) by whole pages to make room.
            delta = -(-(32 + len(hb) - first) // PAGE) * PAGE
            blobs = [[off + delta, b] for off, b in blobs]
            for s in header.get("sections", []):
                if isinstance(s, dict) and isinstance(s.get("offset"), int):
                    s["offset"] += delta
            continue
        data_end = max((off + len(b) for off, b in blobs), default=-(-(32 + len(hb)) // PAGE) * PAGE)
        if sync_index:
            index = _index_from(header)
        ib = index_bytes if index_bytes is not None else pack(index)
        total = data_end + len(gap) + len(ib) + 32
        if not fix_file_length or (header.get("file_length") == total and index.get("file_length") == total):
            break
        header["file_length"] = total
        if not sync_index:
            index["file_length"] = total
    out = bytearray(data_end)
    out[32 : 32 + len(hb)] = hb
    for off, b in blobs:
        out[off : off + len(b)] = b
    out += gap + ib
    true_length = len(out) + 32
    out += TAIL.pack(
        len(ib) if index_length is None else index_length,
        xxh(ib) if index_checksum is None else index_checksum,
        true_length if tail_file_length is None else tail_file_length,
        end_magic,
    )
    out[:32] = PREAMBLE.pack(
        magic,
        parts.major if major is None else major,
        parts.minor if minor is None else minor,
        parts.flags if flags is None else flags,
        len(hb) if header_length is None else header_length,
        xxh(hb) if header_checksum is None else header_checksum,
    )
    return bytes(out + trailing)


def rebuild(data: bytes, **kwargs: Any) -> bytes:
    """``build(parse(data), **kwargs)``: the identity on a valid file (plus overrides)."""
    return build(parse(data), **kwargs)


# -- msgpack by hand -----------------------------------------------------------------------------
def map_pairs(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """A msgpack map from already-encoded (key, value) pairs: duplicates and odd keys allowed."""
    n = len(pairs)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
    return head + b"".join(k + v for k, v in pairs)


def header_with_extra_pair(header: dict[str, Any], key: bytes, value: bytes) -> bytes:
    """``header`` encoded as a map with one more raw (key, value) pair appended."""
    return map_pairs([(pack(k), pack(v)) for k, v in header.items()] + [(key, value)])


# -- zstd frames ---------------------------------------------------------------------------------
def zstd_frame(
    data: bytes, *, level: int = 3, checksum: bool = True, content_size: bool = True, window_log: int | None = None
) -> bytes:
    if window_log is not None:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, window_log=window_log, write_checksum=int(checksum), write_content_size=int(content_size)
        )
        cctx = zstandard.ZstdCompressor(compression_params=params)
    else:
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=checksum, write_content_size=content_size)
    return cctx.compress(data)


@dataclass
class FrameHeader:
    fhd: int
    window_pos: int | None  # offset of the window descriptor
    dict_pos: int
    dict_size: int
    fcs_pos: int
    fcs_size: int
    end: int  # offset of the first block header


def frame_header(frame: bytes) -> FrameHeader:
    assert int.from_bytes(frame[:4], "little") == ZSTD_MAGIC
    fhd = frame[4]
    single = (fhd >> 5) & 1
    pos = 5
    window_pos = None
    if not single:
        window_pos, pos = pos, pos + 1
    dict_size = (0, 1, 2, 4)[fhd & 3]
    dict_pos, pos = pos, pos + dict_size
    fcs_size = (1 if single else 0, 2, 4, 8)[fhd >> 6]
    return FrameHeader(fhd, window_pos, dict_pos, dict_size, pos, fcs_size, pos + fcs_size)


def frame_fields(frame: bytes) -> dict[str, Any]:
    """The header fields of a frame: window_log, dict_id, checksum, content_size (None if absent)."""
    h = frame_header(frame)
    window_log = None
    if h.window_pos is not None:
        wd = frame[h.window_pos]
        assert wd & 7 == 0, "window mantissa not supported"
        window_log = 10 + (wd >> 3)
    content = None
    if h.fcs_size:
        content = int.from_bytes(frame[h.fcs_pos : h.end], "little") + (256 if h.fcs_size == 2 else 0)
    return {
        "window_log": window_log,
        "dict_id": int.from_bytes(frame[h.dict_pos : h.dict_pos + h.dict_size], "little") or None,
        "checksum": bool(h.fhd >> 2 & 1),
        "content_size": content,
    }


_UNSET: Any = object()


def rewrite_header(
    frame: bytes,
    *,
    window_log: Any = _UNSET,
    dict_id: Any = _UNSET,
    checksum: Any = _UNSET,
    content_size: Any = _UNSET,
) -> bytes:
    """Re-encode a frame's header with some fields changed; the blocks (and checksum) are kept.

    ``window_log=None`` makes a single-segment frame (then ``content_size`` is required).
    Setting ``checksum`` only flips the flag: the 4 checksum bytes at the end are left alone.
    """
    h = frame_header(frame)
    f = frame_fields(frame)
    for key, value in (("window_log", window_log), ("dict_id", dict_id), ("checksum", checksum),
                       ("content_size", content_size)):
        if value is not _UNSET:
            f[key] = value
    single = f["window_log"] is None
    content = f["content_size"]
    if content is None:
        assert not single, "a single-segment frame must declare its content size"
        fcs_flag, fcs = 0, b""
    elif content < 256 and single:
        fcs_flag, fcs = 0, content.to_bytes(1, "little")
    elif 256 <= content < 65536 + 256:
        fcs_flag, fcs = 1, (content - 256).to_bytes(2, "little")
    elif content < 1 << 32:
        fcs_flag, fcs = 2, content.to_bytes(4, "little")
    else:
        fcs_flag, fcs = 3, content.to_bytes(8, "little")
    did = f["dict_id"]
    dict_flag, did_bytes = (0, b"") if not did else (3, did.to_bytes(4, "little"))
    fhd = fcs_flag << 6 | int(single) << 5 | int(f["checksum"]) << 2 | dict_flag
    window = b"" if single else bytes([(f["window_log"] - 10) << 3])
    return frame[:4] + bytes([fhd]) + window + did_bytes + fcs + frame[h.end :]


def huge_declared_frame(content_size: int = 1 << 40, *, checksum: bool = False) -> bytes:
    """Single-segment frame declaring ``content_size`` with one 1-byte raw block.

    17 bytes without a content checksum; 21 with one (its flag set, four zero bytes appended).
    """
    fhd = 3 << 6 | 1 << 5 | int(checksum) << 2  # 8-byte content size, single segment, no dictionary
    block = (1 << 3 | 0 << 1 | 1).to_bytes(3, "little")  # size 1, raw, last
    frame = struct.pack("<I", ZSTD_MAGIC) + bytes([fhd]) + content_size.to_bytes(8, "little") + block + b"\x00"
    return frame + (b"\x00" * 4 if checksum else b"")


def skippable_frame(payload: bytes = b"hidden", nibble: int = 0) -> bytes:
    return struct.pack("<II", 0x184D2A50 | nibble, len(payload)) + payload
