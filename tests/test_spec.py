"""spec/FORMAT.md and the code agree: byte tables, constants, limits, the dtype table, tree tags, codecs."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
import torch

from mettaformat import constants as C
from mettaformat._atomic import TEMP_SUFFIX
from mettaformat.container import opened, tree
from mettaformat.container.codecs import zstd as zstd_codec
from mettaformat.container.codecs import zstd_frames
from mettaformat.container.layout import Preamble, TrailerTail
from mettaformat.dtypes import DTYPE_TAGS, dtype_from_tag, itemsize

SPEC = Path(__file__).resolve().parents[1] / "spec"
FORMAT = (SPEC / "FORMAT.md").read_text(encoding="utf-8")
ZSTD = (SPEC / "codecs" / "zstd.md").read_text(encoding="utf-8")
RAW = (SPEC / "codecs" / "raw.md").read_text(encoding="utf-8")

Table = list[dict[str, str]]


def tables(markdown: str) -> list[Table]:
    """Every pipe table of a markdown document, as rows keyed by the header cells."""
    found: list[Table] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            header = _cells(lines[i])
            rows: Table = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(header, _cells(lines[i]), strict=False)))
                i += 1
            found.append(rows)
        else:
            i += 1
    return found


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table_with(markdown: str, *columns: str) -> Table:
    """The first table having all of ``columns``, with ``first`` as the first column."""
    for t in tables(markdown):
        if t and list(t[0])[: len(columns)] == list(columns):
            return t
    raise AssertionError(f"no table with columns {columns}")


def unquote(cell: str) -> str:
    return cell.strip("`")


def hex_bytes(cell: str) -> bytes:
    match = re.search(r"((?:[0-9A-F]{2} )+[0-9A-F]{2})", cell)
    assert match, cell
    return bytes.fromhex(match.group(1))


def integer(cell: str) -> int:
    match = re.match(r"`?(\d+)`?", cell.strip())
    assert match, cell
    return int(match.group(1))


# -- byte tables -------------------------------------------------------------------------------------
def byte_table(markdown: str, first_field: str) -> Table:
    for t in tables(markdown):
        columns = list(t[0]) if t else []
        if len(columns) == 5 and columns[0].startswith("Offset") and columns[1:] == ["Size", "Type", "Field",
                                                                                       "Constraint"] \
                and unquote(t[0]["Field"]) == first_field:
            return [{"Offset" if k == columns[0] else k: v for k, v in r.items()} for r in t]
    raise AssertionError(f"no byte table starting with {first_field}")


def test_preamble_table_matches_layout() -> None:
    rows = byte_table(FORMAT, "magic")
    fields = [(int(r["Offset"]), int(r["Size"]), unquote(r["Field"])) for r in rows]
    assert fields == [(0, 8, "magic"), (8, 2, "major"), (10, 2, "minor"), (12, 4, "flags"),
                      (16, 8, "header_length"), (24, 8, "header_checksum")]
    assert sum(size for _, size, _ in fields) == C.PREAMBLE_SIZE
    assert hex_bytes(rows[0]["Constraint"]) == C.MFMT_MAGIC
    # the table's types and order are the struct the code packs
    length, digest = 0x0102030405060708, 0x1112131415161718
    packed = Preamble(major=3, minor=0, flags=1, header_length=length, header_checksum=digest).pack()
    assert packed == C.MFMT_MAGIC + struct.pack("<HHIQQ", 3, 0, 1, length, digest)
    assert f"`{C.MFMT_VERSION_MAJOR}` for this document" in rows[1]["Constraint"]
    assert f"`{C.MFMT_VERSION_MINOR}` for this document" in rows[2]["Constraint"]


def test_trailer_tail_table_matches_layout() -> None:
    rows = byte_table(FORMAT, "index_length")
    fields = [(r["Offset"], int(r["Size"]), unquote(r["Field"])) for r in rows]
    assert fields == [("L-32", 8, "index_length"), ("L-24", 8, "index_checksum"), ("L-16", 8, "file_length"),
                      ("L-8", 8, "end_magic")]
    assert sum(size for _, size, _ in fields) == C.TRAILER_TAIL_SIZE
    assert hex_bytes(rows[3]["Constraint"]) == C.MFMT_END_MAGIC
    packed = TrailerTail(index_length=1, index_checksum=2, file_length=3).pack()
    assert packed == struct.pack("<QQQ", 1, 2, 3) + C.MFMT_END_MAGIC


def test_stream_table_matches_alignment() -> None:
    rows = next(t for t in tables(FORMAT) if t and list(t[0])[:2] == ["Offset (in the stream)", "Size"])
    assert [unquote(r["Field"]) for r in rows] == ["N", "JSON header", "data region"]
    assert f"multiple of {C.STREAM_DATA_ALIGNMENT}" in rows[1]["Constraint"]


def test_zstd_frame_record_table() -> None:
    rows = byte_table(ZSTD, "compressed_length")
    fields = [(int(r["Offset"]), int(r["Size"]), r["Type"], unquote(r["Field"])) for r in rows]
    assert fields == [(0, 8, "u64", "compressed_length"), (8, 4, "u32", "raw_length"), (12, 4, "u32", "filter")]
    assert struct.calcsize("<QII") == 16 == sum(f[1] for f in fields)
    assert f">= {zstd_frames.MIN_FRAME}" in rows[0]["Constraint"]
    assert str(C.MAX_FRAME_RAW_SIZE) in rows[1]["Constraint"]
    filters = {int(r["Id"]): unquote(r["Name"]) for r in table_with(ZSTD, "Id", "Name", "Meaning")}
    assert filters == {zstd_codec.FILTER_NONE: "none", zstd_codec.FILTER_SHUFFLE: "shuffle",
                       zstd_codec.FILTER_FLOAT_PLANES: "float-planes", zstd_codec.FILTER_PLANES: "planes"}
    assert zstd_codec.ZstdCodec.filters == tuple(filters[i] for i in sorted(filters))
    limits = {r["Limit"].strip(): integer(r["Value"]) for r in table_with(ZSTD, "Limit", "Value", "Error")}
    assert limits == {"`MAX_FRAME_RAW_SIZE`": C.MAX_FRAME_RAW_SIZE, "`MAX_ZSTD_WINDOW`": C.MAX_ZSTD_WINDOW,
                      "smallest `compressed_length`": zstd_frames.MIN_FRAME,
                      "largest `Block_Size`": zstd_frames._BLOCK_MAX, "bytes per block in the ratio bound": 4}
    # the ratio bound as the spec writes it: 10 + 4 * ceil(raw_length / 131072)
    assert "`>= 10 + 4 \u00d7 ceil(raw_length / 131072)`" in rows[0]["Constraint"]
    for raw_length in (1, 131072, 131073, C.MAX_FRAME_RAW_SIZE):
        assert zstd_frames.min_frame_length(raw_length) == 10 + 4 * -(-raw_length // 131072)
    assert f"default {C.ZSTD_DEFAULT_LEVEL}" in ZSTD and f"default {C.ZSTD_DEFAULT_FRAME_SIZE}" in ZSTD


# -- constants and limits ---------------------------------------------------------------------------
def test_named_limits_match_constants() -> None:
    rows = table_with(FORMAT, "Name", "Value", "Bounds", "Error")
    spec = {unquote(r["Name"]): integer(r["Value"]) for r in rows}
    code = {name: getattr(C, name) for name in dir(C) if name.startswith("MAX_")}
    code["MAX_PADDING"] = opened.MAX_PADDING
    assert spec == code


def test_fixed_constants_match() -> None:
    rows = table_with(FORMAT, "Name", "Value", "Meaning")
    spec = {unquote(r["Name"]): r["Value"] for r in rows}
    assert hex_bytes(spec.pop("MFMT_MAGIC")) == C.MFMT_MAGIC
    assert hex_bytes(spec.pop("MFMT_END_MAGIC")) == C.MFMT_END_MAGIC
    assert {name: integer(v) for name, v in spec.items()} == {name: getattr(C, name) for name in spec}
    assert set(spec) >= {"MFMT_VERSION_MAJOR", "MFMT_VERSION_MINOR", "PREAMBLE_SIZE", "TRAILER_TAIL_SIZE",
                         "MFMT_DEFAULT_ALIGNMENT", "STREAM_DATA_ALIGNMENT", "CHECKSUM_SIZE", "FLAG_HAS_TRAILER",
                         "FLAGS_REQUIRED_MASK"}


def test_front_matter_version_and_prose() -> None:
    version = f"{C.MFMT_VERSION_MAJOR}.{C.MFMT_VERSION_MINOR}"
    assert re.search(rf"\*\*Version\*\* \| {re.escape(version)} ", FORMAT)
    assert f"`READER_SUPPORTED_MAJORS` of the reference reader is `{C.READER_SUPPORTED_MAJORS}`" in FORMAT
    assert f"`TEMP_SUFFIX` = `{TEMP_SUFFIX}`" in FORMAT
    assert all(f'`"{name}"`' in FORMAT for name in C.CHECKSUM_NAMES)
    assert "All integers in this format are little-endian." in FORMAT


def test_codec_names() -> None:
    rows = table_with(FORMAT, "Name", "Page", "Summary")
    assert tuple(unquote(r["Name"]) for r in rows) == C.CODEC_NAMES
    for name in C.CODEC_NAMES:
        page = SPEC / "codecs" / f"{name}.md"
        text = page.read_text(encoding="utf-8")
        for heading in ("## Codec name", "## Configuration parameters", "## Format and algorithm", "## Change log"):
            assert heading in text, (page, heading)
        assert f"## Codec name\n\n`{name}`" in text


# -- dtypes -----------------------------------------------------------------------------------------
def test_dtype_table_equals_code() -> None:
    rows = table_with(FORMAT, "Tag", "torch dtype", "Item size", "Status")
    spec = [(unquote(r["Tag"]), unquote(r["torch dtype"]), int(r["Item size"])) for r in rows
            if r["Status"] == "active"]
    code = [(tag, str(dtype_from_tag(tag)), itemsize(tag)) for tag in DTYPE_TAGS]
    assert spec == code
    for tag, _, size in spec:
        assert torch.empty(0, dtype=dtype_from_tag(tag)).element_size() == size, tag
    assert all(r["Status"] in ("active", "tombstone") for r in rows)


# -- object trees -----------------------------------------------------------------------------------
def test_tree_tags_table_equals_code() -> None:
    rows = table_with(FORMAT, "Tag", "Payload", "Decodes to")
    assert tuple(unquote(r["Tag"]) for r in rows) == tree.TREE_TAGS
    assert "1 to 4300 characters" in FORMAT and tree._MAX_INT_DIGITS == 4300


@pytest.mark.parametrize("section", ["## 1. Abstract", "## 2. Document conventions", "## 3. File layout",
                                     "## 4. Header", "## 6. Data types", "## 7. Checksums", "## 8. Codecs",
                                     "## 9. Object trees", "## 10. Versioning and compatibility",
                                     "## 11. Writer requirements", "## 12. Reserved values",
                                     "## 13. Limits and security considerations", "## 15. Conformance vectors",
                                     "## 16. Version history"])
def test_required_sections_present(section: str) -> None:
    assert section in FORMAT


def test_conformance_vector_table_lists_every_vector() -> None:
    rows = table_with(FORMAT, "Vector", "Exercises")
    listed = {unquote(r["Vector"]) for r in rows}
    on_disk = {p.stem for p in (SPEC / "vectors").glob("*.mfmt")}
    assert listed == on_disk


def test_raw_page_mentions_layout_rules() -> None:
    assert "`length` MUST equal `stream.length`" in RAW


def test_dtype_and_device_grammars_equal_code() -> None:
    """§9.2.2 lists the $dtype names and $device types; the reader's fixed tables are exactly those."""
    from mettaformat.container.tree_values import DEVICE_TYPES, DTYPE_NAMES, MAX_DEVICE_INDEX

    section = FORMAT[FORMAT.index("#### 9.2.2"):FORMAT.index("## 9.3") if "## 9.3" in FORMAT else None]
    dtype_text, device_text = section.split("A `$device` is", 1)
    names: list[str] = []
    for first, last in re.findall(r"`([a-z]+)1` to `\1(\d)`", dtype_text):
        names += [f"{first}{i}" for i in range(1, int(last) + 1)]
    dtype_text = re.sub(r"`([a-z]+)1` to `\1\d`", "", dtype_text.split("aliases such as", 1)[0] +
                        dtype_text.split("are not names):", 1)[1])
    names += re.findall(r"`([a-z0-9_]+)`", dtype_text)
    assert sorted(names) == sorted(DTYPE_NAMES)
    types = re.findall(r"`([a-z]+)`", device_text.split("(lower case)", 1)[0])
    assert [t for t in types if t not in ("TYPE", "INDEX")] == list(DEVICE_TYPES)
    assert f"from `0` to `{MAX_DEVICE_INDEX}`" in device_text
