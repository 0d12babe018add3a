"""Generate the conformance vectors of ``spec/FORMAT.md`` (section "Conformance vectors").

Run from the repository root::

    .venv/bin/python spec/vectors/make_vectors.py

A vector is written only if its ``NAME.mfmt`` does not exist yet: committed vectors are never
regenerated, so a change of writer or reader that alters them shows up as a failing test
(``tests/test_vectors.py``) instead of silently rewriting the expected results. To retire a
vector, delete both of its files on purpose and say why in the change log of ``FORMAT.md``.

Valid vectors are written by the reference writer. Invalid vectors are made from valid ones
by struct-level edits, with every checksum recomputed except the one an edit means to break,
so that the error a reader reports is the intended one. Each is checked against the reader
before it is written.

Every vector comes with ``NAME.expected.json``:

* valid: ``{"valid": true, "keys": [...], "tensors": {name: {"dtype", "shape", "sha256"}},
  "aliases": {alias: target}, "metadata": <canonical form>}``, plus optionally
  ``"sections"`` (other sections, same shape as ``tensors``), ``"trees"`` (tree name to
  canonical form) and ``"warning"`` (a reader warns when opening it);
* invalid: ``{"valid": false, "error": "<exception class name>", "region": "<region>"}``.

The canonical form (``canonical``) maps a decoded object tree to JSON, see ``README.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import torch
import xxhash

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mettaformat  # noqa: E402
from mettaformat.container.codecs import ZstdCodec  # noqa: E402
from mettaformat.container.tensor_index import section_to_entries_form  # noqa: E402
from mettaformat.container.tree import LegacyObject, TensorRef  # noqa: E402
from mettaformat.container.writer import _write, write_container  # noqa: E402
from mettaformat.dtypes import DTYPE_TAGS, dtype_from_tag, tag_from_dtype  # noqa: E402

MAGIC = b"\x89MFT\r\n\x1a\n"
END_MAGIC = b"MFTEND\r\n"
PREAMBLE = struct.Struct("<8sHHIQQ")
TAIL = struct.Struct("<QQQ8s")
MAX_VECTOR_SIZE = 64 << 10
_SAFE_INT = 1 << 53


# -- canonical JSON form of decoded values ---------------------------------------------------------
def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw little-endian bytes, in row-major order."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def tensor_description(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": tag_from_dtype(t.dtype), "shape": list(t.shape), "sha256": tensor_sha256(t)}


def _sort_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def canonical(value: Any) -> Any:
    """A JSON value describing a decoded object tree exactly (see README.md)."""
    return _Canonical().convert(value)


class _Canonical:
    def __init__(self) -> None:
        self.objects: dict[int, int] = {}

    def convert(self, v: Any) -> Any:
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return v if -_SAFE_INT < v < _SAFE_INT else {"$int": str(v)}
        if isinstance(v, float):
            return {"$float": repr(v)}
        if isinstance(v, bytes):
            return {"$bytes": v.hex()}
        if isinstance(v, torch.dtype):
            return {"$dtype": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {"$device": str(v)}
        if isinstance(v, torch.Size):
            return {"$size": list(v)}
        if isinstance(v, torch.Tensor):
            return {"$tensor": tensor_description(v)}
        if isinstance(v, TensorRef):
            return {"$tensor": [v.section, v.name]}
        if isinstance(v, LegacyObject):
            return self._object(v)
        if isinstance(v, tuple):
            return {"$tuple": [self.convert(x) for x in v]}
        if isinstance(v, list):
            return [self.convert(x) for x in v]
        if isinstance(v, (set, frozenset)):
            tag = "$frozenset" if isinstance(v, frozenset) else "$set"
            return {tag: sorted((self.convert(x) for x in v), key=_sort_key)}
        if isinstance(v, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in v):
                return {k: self.convert(x) for k, x in v.items()}
            return {"$map": [[self.convert(k), self.convert(x)] for k, x in v.items()]}
        raise TypeError(f"no canonical form for {type(v).__name__}")

    def _object(self, obj: LegacyObject) -> Any:
        known = self.objects.get(id(obj))
        if known is not None:
            return {"$ref": known}
        oid = self.objects[id(obj)] = len(self.objects)
        return {"$object": {
            "id": oid, "class": [obj.module, obj.name], "kind": obj.kind,
            "args": [self.convert(x) for x in obj.args], "state": self.convert(obj.state),
            "items": [[self.convert(k), self.convert(x)] for k, x in obj.items],
            "listitems": [self.convert(x) for x in obj.listitems],
        }}


# -- reading a vector the way tests/test_vectors.py does ---------------------------------------------
def describe(path: Path) -> dict[str, Any]:
    """Open and fully load ``path``; return its expected.json content (valid files)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mettaformat.open(path) as ckpt:
            keys = ckpt.keys()
            metadata = canonical(ckpt.metadata)
            trees = {name: canonical(ckpt.tree(name)) for name in ckpt.tree_names}
            others = {name: ckpt.load_section(name) for name in ckpt.sections if name != "model"}
            aliases = dict(ckpt.header.section("model").aliases) if ckpt.header.section("model") else {}
        model = mettaformat.load_file(path)
    out: dict[str, Any] = {
        "valid": True,
        "keys": keys,
        "tensors": {name: tensor_description(t) for name, t in model.items() if name not in aliases},
        "aliases": aliases,
        "metadata": metadata,
    }
    if others:
        out["sections"] = {s: {n: tensor_description(t) for n, t in d.items()} for s, d in others.items()}
    if trees:
        out["trees"] = trees
    if any("newer than this reader" in str(w.message) for w in caught):
        out["warning"] = True
    return out


def reader_error(path: Path) -> tuple[str, str | None] | None:
    """(class name, region) of the error a full read of ``path`` raises, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mettaformat.open(path) as ckpt:
                ckpt.metadata  # noqa: B018
                for name in ckpt.tree_names:
                    ckpt.tree(name)
                for name in ckpt.sections:
                    ckpt.load_section(name)
            mettaformat.load_file(path)
    except mettaformat.MettaFormatError as e:
        return type(e).__name__, e.region
    return None


# -- struct-level editing ---------------------------------------------------------------------------
def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def xxh(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


def split(data: bytes, *, columnar: bool = False) -> tuple[dict[str, Any], dict[str, Any], dict[str, bytes]]:
    """(header, trailer index, section bytes by name) of a file.

    Unless ``columnar``, a 3.1 index is turned into the 3.0 form (one map per tensor) and the
    columnar extension dropped, so that the builders of the 3.0 vectors still make 3.0 files.
    """
    header_length = struct.unpack_from("<Q", data, 16)[0]
    header = msgpack.unpackb(data[32:32 + header_length], raw=False)
    index_length = struct.unpack_from("<Q", data, len(data) - 32)[0]
    index = msgpack.unpackb(data[len(data) - 32 - index_length:len(data) - 32], raw=False)
    sections = {s["name"]: data[s["offset"]:s["offset"] + s["length"]] for s in header["sections"]}
    if not columnar:
        for value in (header, index):
            value.pop("must_understand", None)
            for s in value["sections"]:
                section_to_entries_form(s)
    return header, index, sections


def assemble(header: dict[str, Any], sections: dict[str, bytes], *, index: dict[str, Any] | None = None,
             major: int = 3, minor: int = 0, flags: int = 1, header_bytes: bytes | None = None,
             splice: tuple[str, bytes] | None = None, splice_index: bool = False) -> bytes:
    """Lay out a file from its parts, keeping section offsets; the index follows the last section.

    ``file_length`` is recomputed in the header and index; every checksum is recomputed.
    ``header_bytes`` replaces the encoded header (for msgpack that ``pack`` cannot produce).
    ``splice = (marker, raw)`` replaces the encoding of the str ``marker`` by the bytes ``raw`` in the
    header (or, with ``splice_index``, in the index), after ``file_length`` is set.
    """

    def encode(value: dict[str, Any], spliced: bool) -> bytes:
        body = pack(value)
        return body.replace(pack(splice[0]), splice[1]) if splice is not None and spliced else body

    end = max((s["offset"] + s["length"] for s in header["sections"]), default=4096)
    for _ in range(4):
        idx = index if index is not None else {k: header[k] for k in ("file_length", "checksum", "sections")}
        index_bytes = encode(idx, splice_index)
        file_length = end + len(index_bytes) + 32
        if header["file_length"] == file_length and idx["file_length"] == file_length:
            break
        header["file_length"] = file_length
        if index is not None:
            index["file_length"] = file_length
    if header_bytes is None:
        header_bytes = encode(header, not splice_index)
    hb = header_bytes
    first = min((s["offset"] for s in header["sections"]), default=4096)
    assert 32 + len(hb) <= first, "the edited header no longer fits before the first section"
    out = bytearray(file_length)
    out[0:32] = PREAMBLE.pack(MAGIC, major, minor, flags, len(hb), xxh(hb))
    out[32:32 + len(hb)] = hb
    for s in header["sections"]:
        out[s["offset"]:s["offset"] + s["length"]] = sections[s["name"]]
    out[end:end + len(index_bytes)] = index_bytes
    out[end + len(index_bytes):] = TAIL.pack(len(index_bytes), xxh(index_bytes), file_length, END_MAGIC)
    return bytes(out)


def frames(section: dict[str, Any]) -> list[tuple[int, int, int]]:
    table = section["frames"]
    return [struct.unpack_from("<QII", table, i) for i in range(0, len(table), 16)]


# -- valid vectors ------------------------------------------------------------------------------------
def pattern(n: int, seed: int) -> bytes:
    """Deterministic bytes (a linear congruential sequence)."""
    x, out = seed, bytearray(n)
    for i in range(n):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out[i] = (x >> 16) & 0xFF
    return bytes(out)


def from_bytes(tag: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    dtype = dtype_from_tag(tag)
    numel = math.prod(shape)
    size = torch.empty(0, dtype=dtype).element_size()
    data = pattern(numel * size, seed)
    if tag == "BOOL":
        data = bytes(b & 1 for b in data)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).clone()


def save_bytes(tensors: dict[str, torch.Tensor], **kwargs: Any) -> bytes:
    return mettaformat.save(tensors, **kwargs)


def write_with(codec: ZstdCodec, sections: dict[str, dict[str, torch.Tensor]], metadata: dict[str, Any]) -> bytes:
    with tempfile.TemporaryFile() as f:
        _write(f.fileno(), sections, metadata, None, codec)
        f.seek(0)
        return f.read()


def v_all_dtypes() -> bytes:
    tensors = {f"t.{tag.lower()}": from_bytes(tag, (2, 3), i + 1) for i, tag in enumerate(DTYPE_TAGS)}
    return save_bytes(tensors, metadata={"vector": "all_dtypes"})


def v_empty_tensor() -> bytes:
    return save_bytes({"empty": torch.empty(0), "empty.3d": torch.empty(3, 0, 2, dtype=torch.int16),
                       "w": from_bytes("F32", (4,), 7)})


def v_scalar() -> bytes:
    return save_bytes({"f64": torch.tensor(math.pi, dtype=torch.float64), "i64": torch.tensor(-(2 ** 40)),
                       "flag": torch.tensor(True), "bf16": torch.tensor(1.5, dtype=torch.bfloat16)})


def v_tied() -> bytes:
    embed = from_bytes("F32", (4, 3), 11)
    return save_bytes({"embed.weight": embed, "bias": from_bytes("F16", (3,), 12), "head.weight": embed,
                       "lm.weight": embed})


def smooth(n: int) -> torch.Tensor:
    return torch.sin(torch.linspace(0.0, 6.0, n, dtype=torch.float32)) * 0.1


def v_zstd() -> bytes:
    tensors = {"w": smooth(4096), "steps": torch.arange(300, dtype=torch.int64), "mask": from_bytes("BOOL", (37,), 3),
               "h": smooth(64).to(torch.bfloat16), "tied": torch.empty(0)}
    return save_bytes(tensors, compression="zstd", metadata={"epoch": 7})


def v_zstd_multiframe() -> bytes:
    tensors = {"w": smooth(4096).reshape(64, 64), "b": from_bytes("I8", (5000,), 5), "s": torch.tensor(2.0)}
    return write_with(ZstdCodec(level=3, frame_size=4096), {"model": tensors}, {"frame_size": 4096})


def v_zstd_planes() -> bytes:
    """3.2 plane filters: float planes, integer planes, stored (raw-block) frames, several chunks."""
    noisy = torch.frombuffer(bytearray(pattern(4 * 3000, 21)), dtype=torch.int32) & 0x3C0FFFFF  # low bytes random
    tensors = {"f32": smooth(3000), "bf16": smooth(2048).to(torch.bfloat16), "f16": smooth(2100).half(),
               "f64": smooth(600).double(), "i32": torch.arange(3000, dtype=torch.int32) * 7,
               "noisy": noisy.view(torch.float32), "small": smooth(5), "mask": from_bytes("BOOL", (4100,), 4)}
    return write_with(ZstdCodec(level="max", frame_size=8192), {"model": tensors}, {"vector": "zstd_planes"})


def v_metadata_tree() -> bytes:
    shared = LegacyObject("metta.agent.policy_record", "PolicyRecord", args=(1,), state={"uri": "file://x"})
    graph = LegacyObject("collections", "OrderedDict", kind="reduce", items=[("a", 1), (2, shared)],
                         listitems=[shared])
    metadata = {
        "epoch": 12,
        "tuple": (1, "a", (2.5, None), ()),
        "non_str_keys": {1: "one", (2, 3): "pair", "s": True, None: b"\x00\xff"},
        "dollar_key": {"$not_a_tag": 1},
        "big_ints": [2 ** 100, -(2 ** 70), 2 ** 64 - 1, -(2 ** 63), 2 ** 53],
        "floats": [float("nan"), float("inf"), float("-inf"), -0.0, 1e-300, 0.1],
        "dtype": torch.bfloat16,
        "dtypes": [torch.float8_e4m3fn, torch.complex128, torch.bool],
        "device": torch.device("cuda", 1),
        "cpu": torch.device("cpu"),
        "set": {3, 1, 2},
        "frozenset": frozenset({"b", "a"}),
        "size": torch.Size([2, 3]),
        "nested": {"list": [[1, [2, [3, {"deep": ("x",)}]]]], "empty": {}, "empty_list": []},
        "objects": [graph, shared],
        "unicode": "héllo ✓",
    }
    return save_bytes({"w": from_bytes("F32", (2,), 9)}, metadata=metadata)


def v_object_tree() -> bytes:
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": from_bytes("F32", (2, 2), 21)},
                  1: {"step": torch.tensor(3.0), "exp_avg": from_bytes("F32", (3,), 22)}},
        "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": [0, 1]}],
    }
    rng = from_bytes("U8", (16,), 23)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "v.mfmt"
        write_container(
            path, {"model": {"w": from_bytes("F32", (2, 2), 20)}},
            metadata={"agent_step": 1000}, trees={"optimizer": optimizer, "rng": {"torch": rng, "again": rng}},
        )
        return path.read_bytes()


def v_newer_minor() -> bytes:
    """A 3.1 file: an unknown optional flag and an unknown header key; readers load it and warn."""
    header, index, sections = split(save_bytes({"w": from_bytes("F32", (3,), 31)}, metadata={"epoch": 1}))
    header["x_future_field"] = {"anything": [1, 2]}
    return assemble(header, sections, index=index, minor=1, flags=1 | (1 << 16))


# -- invalid vectors ---------------------------------------------------------------------------------------
def base_raw() -> bytes:
    return save_bytes({"w": from_bytes("F32", (2, 3), 41), "b": from_bytes("I8", (3,), 42)}, metadata={"epoch": 1})


def i_bad_magic() -> bytes:
    data = bytearray(base_raw())
    data[1:4] = b"MFX"
    return bytes(data)


def i_unsupported_major() -> bytes:
    header, index, sections = split(base_raw())
    return assemble(header, sections, index=index, major=4)


def i_must_understand() -> bytes:
    header, index, sections = split(base_raw())
    header["must_understand"] = ["x.sparse_tensors"]
    return assemble(header, sections, index=index)


def i_header_duplicate_key() -> bytes:
    header, index, sections = split(base_raw())
    body = pack(header)
    assert 0x80 <= body[0] < 0x8F  # fixmap: add one more (duplicate) entry
    body = bytes([body[0] + 1]) + body[1:] + pack("checksum") + pack("xxh3-64")
    return assemble(header, sections, index=index, header_bytes=body)


def i_header_bool_as_int() -> bytes:
    header, index, sections = split(base_raw())
    header["sections"][0]["tensors"][0]["shape"] = [True, 3]
    return assemble(header, sections, index=index)


def i_layout_truncated() -> bytes:
    return base_raw()[:-1]


def i_layout_tensor_hole() -> bytes:
    header, index, sections = split(base_raw())
    s = header["sections"][0]
    b = next(t for t in s["tensors"] if t["name"] == "b")
    b["offsets"] = [b["offsets"][0] + 1, b["offsets"][1] + 1]
    s["stream"]["length"] += 1
    s["length"] += 1
    sections["model"] += b"\x00"
    return assemble(header, sections, index=index)


def i_limit_header_length() -> bytes:
    data = bytearray(base_raw())
    struct.pack_into("<Q", data, 16, (256 << 20) + 1)
    return bytes(data)


def i_unknown_codec() -> bytes:
    header, index, sections = split(base_raw())
    header["sections"][0]["codec"]["name"] = "lz4"
    index["sections"][0]["codec"]["name"] = "lz4"
    return assemble(header, sections, index=index)


def i_codec_bad_frame() -> bytes:
    data = save_bytes({"w": smooth(4096)}, compression="zstd")
    header, _, _ = split(data)
    s = header["sections"][0]
    out = bytearray(data)
    out[s["offset"] + frames(s)[0][0]] ^= 0xFF  # the magic of frame 1 (the first tensor frame)
    return bytes(out)


def i_codec_frame_checksum() -> bytes:
    data = save_bytes({"w": smooth(4096)}, compression="zstd")
    header, _, _ = split(data)
    s = header["sections"][0]
    f = frames(s)
    out = bytearray(data)
    out[s["offset"] + f[0][0] + f[1][0] - 1] ^= 0x01  # last byte of frame 1: its zstd content checksum
    return bytes(out)


def i_codec_plane_group() -> bytes:
    """A plane group whose frames disagree on their raw length."""
    header, index, sections = split(v_zstd_planes())
    table = [list(f) for f in frames(header["sections"][0])]
    table[2][1] += 1  # the second plane of the first tensor's first group
    for h in (header, index):
        h["sections"][0]["frames"] = b"".join(struct.pack("<QII", *f) for f in table)
    return assemble(header, sections, index=index, minor=2)


def i_integrity_tensor() -> bytes:
    data = base_raw()
    header, _, _ = split(data)
    s = header["sections"][0]
    out = bytearray(data)
    out[s["offset"] + s["stream"]["header_length"] + 5] ^= 0x01
    return bytes(out)


def i_integrity_header() -> bytes:
    out = bytearray(base_raw())
    out[40] ^= 0x01
    return bytes(out)


def i_integrity_trailer_index() -> bytes:
    header, index, sections = split(base_raw())
    index["sections"][0]["tensors"][0]["checksum"] = bytes(8)  # checksummed, but disagrees with the header
    return assemble(header, sections, index=index)


# -- 3.1: the columnar index, and the answers the spec gives since ----------------------------------------
def v_columnar_index() -> bytes:
    """The 3.1 layout as the reference writer makes it: mixed item sizes (data order differs from the
    saved order), a tie, an empty tensor and a scalar."""
    embed = from_bytes("F32", (3, 2), 51)
    return save_bytes({"mask": from_bytes("BOOL", (5,), 52), "embed": embed, "steps": from_bytes("I64", (2,), 53),
                       "head": embed, "empty": torch.empty(0, 4, dtype=torch.float16), "scale": torch.tensor(0.5)},
                      metadata={"vector": "columnar_index"})


def base_31() -> bytes:
    return save_bytes({"w": from_bytes("F32", (2, 3), 61), "b": from_bytes("I8", (3,), 62)}, metadata={"epoch": 1})


def v_future_minor() -> bytes:
    """A much newer minor: unknown keys in every map a reader parses, a differing codec configuration in
    the trailer index (not compared), an unknown optional flag. Readers load it and warn."""
    header, index, sections = split(base_31(), columnar=True)
    header["x_future_field"] = {"anything": [1, 2]}
    for value in (header, index):
        s = value["sections"][0]
        s["x_note"] = "ignored"
        s["stream"]["x_extra"] = 1
        s["index"]["x_column"] = b"\x00\x01"
    header["sections"][0]["codec"]["configuration"] = {"x_level": 9}
    index["sections"][0]["codec"]["configuration"] = {"x_level": 1}
    return assemble(header, sections, index=index, minor=65535, flags=1 | (1 << 17))


def v_msgpack_nesting_limit() -> bytes:
    """1024 nested arrays and maps, the header map included, the innermost one empty: the most allowed."""
    header, index, sections = split(base_31(), columnar=True)
    header["x_deep"] = "@@DEEP@@"
    return assemble(header, sections, index=index, minor=1, splice=("@@DEEP@@", b"\x91" * 1022 + b"\x90"))


def i_msgpack_nesting() -> bytes:
    header, index, sections = split(base_31(), columnar=True)
    header["x_deep"] = "@@DEEP@@"
    return assemble(header, sections, index=index, minor=1, splice=("@@DEEP@@", b"\x91" * 1023 + b"\x90"))


def _with_raw_value(key_path: Callable[[dict[str, Any]], dict[str, Any]], key: str, raw: bytes,
                    in_index: bool = False) -> bytes:
    """base_31 with ``raw`` msgpack bytes stored under ``key`` of the map ``key_path`` selects."""
    header, index, sections = split(base_31(), columnar=True)
    target = index if in_index else header
    key_path(target)[key] = "@@RAW@@"
    return assemble(header, sections, index=index, minor=1, splice=("@@RAW@@", raw), splice_index=in_index)


_TIMESTAMP = b"\xd6\xff\x00\x00\x00\x01"  # fixext 4, type -1: a msgpack timestamp


def i_timestamp_unknown_key() -> bytes:
    return _with_raw_value(lambda h: h, "x_when", _TIMESTAMP)


def i_timestamp_section_entry() -> bytes:
    return _with_raw_value(lambda h: h["sections"][0], "x_when", _TIMESTAMP)


def i_timestamp_trailer_index() -> bytes:
    return _with_raw_value(lambda h: h["sections"][0]["index"], "x_when", _TIMESTAMP, in_index=True)


def i_ext_codec_configuration() -> bytes:
    return _with_raw_value(lambda h: h["sections"][0]["codec"]["configuration"], "x", b"\xd4\x05\x01")


def i_bytes_key_codec_configuration() -> bytes:
    header, index, sections = split(base_31(), columnar=True)
    header["sections"][0]["codec"]["configuration"] = {b"level": 3}
    return assemble(header, sections, index=index, minor=1)


def i_unknown_dtype_region() -> bytes:
    """An unknown dtype is a schema error of the section entry: region section 'model', like a bad shape."""
    header, index, sections = split(base_raw())
    header["sections"][0]["tensors"][0]["dtype"] = "F31"
    return assemble(header, sections, index=index)


def _columnar_edit(edit: Callable[[dict[str, Any]], None]) -> bytes:
    header, index, sections = split(base_31(), columnar=True)
    edit(header["sections"][0]["index"])
    edit(index["sections"][0]["index"])
    return assemble(header, sections, index=index, minor=1)


def i_columnar_unknown_dtype_code() -> bytes:
    return _columnar_edit(lambda ix: ix.update(dtypes=bytes([200]) + ix["dtypes"][1:]))


def i_columnar_names_unterminated() -> bytes:
    return _columnar_edit(lambda ix: ix.update(names=ix["names"][:-1]))


def i_columnar_short_column() -> bytes:
    return _columnar_edit(lambda ix: ix.update(ranks=ix["ranks"][:-1]))


def i_columnar_order_not_permutation() -> bytes:
    return _columnar_edit(lambda ix: ix.update(order=struct.pack("<2I", 0, 0)))


def i_columnar_alias_target() -> bytes:
    return _columnar_edit(lambda ix: ix.update(aliases=b"tied\x00", alias_targets=struct.pack("<I", 2)))


def i_columnar_and_entries() -> bytes:
    header, index, sections = split(base_31(), columnar=True)
    for value in (header, index):
        value["sections"][0]["tensors"] = []
    return assemble(header, sections, index=index, minor=1)


def i_trailer_tensor_order() -> bytes:
    """The trailer index lists the same tensors in another order: indexes must match in order too."""
    header, index, sections = split(base_raw())
    index["sections"][0]["tensors"].reverse()
    return assemble(header, sections, index=index)


def i_must_understand_first() -> bytes:
    """An unknown extension wins over a schema error elsewhere: must_understand is checked first."""
    header, index, sections = split(base_31(), columnar=True)
    header["must_understand"].append("x.other")
    header["checksum"] = "md5"
    return assemble(header, sections, index=index, minor=1)


def _stream_json_edit(edit: Callable[[bytes], bytes]) -> bytes:
    """base_31 with its safetensors JSON replaced (same length, padded with spaces); checksums follow."""
    header, index, sections = split(base_31(), columnar=True)
    blob = bytearray(sections["model"])
    n = struct.unpack_from("<Q", blob)[0]
    text = edit(bytes(blob[8:8 + n]).rstrip(b" "))
    assert len(text) <= n, "the edited JSON must fit the stream header"
    blob[8:8 + n] = text + b" " * (n - len(text))
    sections["model"] = bytes(blob)
    digest = xxh(bytes(blob[:8 + n])).to_bytes(8, "little")
    for value in (header, index):
        value["sections"][0]["stream"]["header_checksum"] = digest
    return assemble(header, sections, index=index, minor=1)


def i_json_float_shape() -> bytes:
    return _stream_json_edit(lambda t: t.replace(b'"shape":[2,3]', b'"shape":[2.0,3]'))


def i_json_bool_offset() -> bytes:
    return _stream_json_edit(lambda t: t.replace(b'"data_offsets":[0,', b'"data_offsets":[false,'))


def i_json_nan() -> bytes:
    return _stream_json_edit(lambda t: t.replace(b'"format":"pt"', b'"format":"pt","x":NaN'))


def i_json_metadata_not_string() -> bytes:
    return _stream_json_edit(lambda t: t.replace(b'"format":"pt"', b'"format":"pt","x":1'))


def i_json_duplicate_key() -> bytes:
    return _stream_json_edit(lambda t: t.replace(b'"format":"pt"', b'"format":"pt","format":"pt"'))


def i_json_bom() -> bytes:
    return _stream_json_edit(lambda t: b"\xef\xbb\xbf" + t)


def i_bool_byte() -> bytes:
    """A BOOL element holding 2 (the checksum agrees): readers refuse it when they verify the tensor."""
    data = bytearray(save_bytes({"mask": from_bytes("BOOL", (4,), 63)}))
    header, index, sections = split(bytes(data), columnar=True)
    blob = bytearray(sections["model"])
    hl = header["sections"][0]["stream"]["header_length"]
    blob[hl] = 2
    sections["model"] = bytes(blob)
    digest = xxh(bytes(blob[hl:hl + 4])).to_bytes(8, "little")
    for value in (header, index):
        value["sections"][0]["index"]["checksums"] = digest
    return assemble(header, sections, index=index, minor=1)


# -- object trees: the grammars and rules a reader needs no torch build to know ----------------------------
def _nest(depth: int, leaf: Any) -> Any:
    """``leaf`` as the only element of ``depth`` nested arrays."""
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def _with_metadata(metadata: Any, trees: dict[Any, Any] | None = None) -> bytes:
    """base_31 with a hand-encoded metadata tree (values the writer itself would refuse, too)."""
    header, index, sections = split(base_31(), columnar=True)
    header["metadata"] = metadata
    if trees is not None:
        header["trees"] = trees
    return assemble(header, sections, index=index, minor=1)


def v_tree_depth_limit() -> bytes:
    """Values at depth 100, the most allowed: an empty array, a $size, the key and value of a $map pair,
    an $object's args. The metadata map is depth 0, its values depth 1."""
    return _with_metadata({
        "empty": _nest(99, []),
        "size": _nest(99, {"$size": [2, 3]}),
        "pair": _nest(98, {"$map": [[{"$tuple": []}, {"$frozenset": []}]]}),
        "args": _nest(98, {"$object": {"id": 0, "class": ["m", "C"], "args": [None]}}),
    })


def v_tree_keys() -> bytes:
    """Every kind of $map key and set member: null, bool, int, float, str, bin, $int, $tuple, $frozenset,
    $dtype, $device, $size, $object; and the $device and $dtype grammars at their edges."""
    return _with_metadata({
        "map": {"$map": [[None, 0], [True, 1], [2, 2], [2.5, 3], ["s", 4], [b"b", 5], [{"$int": str(2**70)}, 6],
                         [{"$tuple": [1, "a"]}, 7], [{"$frozenset": [1, 2]}, 8], [{"$dtype": "float32"}, 9],
                         [{"$device": "cuda:127"}, 10], [{"$size": [1]}, 11],
                         [{"$object": {"id": 0, "class": ["m", "K"]}}, 12]]},
        "set": {"$set": [-1, -2, 0.5, "x", {"$tuple": []}]},
        "devices": [{"$device": d} for d in ("cpu", "cuda:0", "meta", "privateuseone:0", "xla:127", "mps")],
        "dtypes": [{"$dtype": d} for d in ("complex32", "quint8", "float8_e8m0fnu", "bits8", "uint3")],
    })


def v_object_defaults() -> bytes:
    """$object with only id and class: kind "newobj", no args, no state, no items, no listitems."""
    return _with_metadata({"bare": {"$object": {"id": 0, "class": ["m", "Bare"]}}, "again": {"$ref": 0}})


def i_tree_depth() -> bytes:
    return _with_metadata({"deep": _nest(100, [])})


def i_tree_size_depth() -> bytes:
    return _with_metadata({"deep": _nest(100, {"$size": [1]})})


def i_tree_key_collision() -> bytes:
    return _with_metadata({"m": {"$map": [[1, "int"], [1.0, "float"]]}})


def i_tree_bool_int_key() -> bytes:
    return _with_metadata({"m": {"$map": [[True, "bool"], [1, "int"]]}})


def i_tree_nan_member() -> bytes:
    return _with_metadata({"s": {"$set": [float("nan")]}})


def i_tree_list_key() -> bytes:
    return _with_metadata({"m": {"$map": [[[1, 2], "list"]]}})


def i_tree_hash_flood() -> bytes:
    """Nine distinct integers with one hash value in CPython (1 plus multiples of 2^61 - 1): refused before a
    dict is built."""
    return _with_metadata({"m": {"$map": [[1 + k * ((1 << 61) - 1), k] for k in range(9)]}})


def _delta_pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A base and its next checkpoint: small steps on F32 and BF16 weights, an unchanged I32 tensor,
    a reshaped and a new tensor (both stored standalone)."""
    g = torch.Generator().manual_seed(33)
    w = torch.randn(48, 64, generator=g)
    h = torch.randn(40, 64, generator=g).bfloat16()
    base = {"w": w, "h": h, "steps": torch.arange(64, dtype=torch.int32), "r": torch.ones(4, 6)}
    step = {"w": w + 1e-3 * torch.randn(48, 64, generator=g), "h": (h.float() + 1e-2 * torch.randn(40, 64, generator=g)
            ).bfloat16(), "steps": base["steps"].clone(), "r": torch.ones(6, 4), "new": torch.arange(8.0)}
    return base, step


def v_delta_base() -> bytes:
    """The base of ``valid_delta`` (a 3.2-style standalone zstd file)."""
    return save_bytes(_delta_pair()[0], compression="zstd")


def _delta_on_base(step: dict[str, torch.Tensor]) -> bytes:
    """``step`` saved as a delta of ``valid_delta_base.mfmt`` (the base lies beside it)."""
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "valid_delta_base.mfmt"
        base.write_bytes(v_delta_base())
        mettaformat.save_file(step, Path(d) / "delta.mfmt", base=base, metadata={"step": 1})
        return (Path(d) / "delta.mfmt").read_bytes()


def v_delta() -> bytes:
    """3.3: tensors stored as zigzag differences of whole elements from ``valid_delta_base.mfmt``."""
    from mettaformat.container import delta_write

    written, delta_write.WRITE_FILTER = delta_write.WRITE_FILTER, "zigzag-sub"
    try:
        return _delta_on_base(_delta_pair()[1])
    finally:
        delta_write.WRITE_FILTER = written


def _delta_high_step() -> dict[str, torch.Tensor]:
    """Steps small enough that the low bytes of the weights are better stored as they are: F32 ``w`` (3 planes
    of 4 KiB) and BF16 ``h`` take their high bytes from the base, I32 ``steps`` moved by one."""
    base = _delta_pair()[0]
    g = torch.Generator().manual_seed(34)
    return {"w": base["w"] + 1e-5 * torch.randn(48, 64, generator=g),
            "h": (base["h"].float() * (1 + 1e-2 * torch.randn(40, 64, generator=g))).bfloat16(),
            "steps": base["steps"] + 1, "r": torch.ones(6, 4)}


def v_delta_high() -> bytes:
    """3.4: ``zigzag-sub-high`` residuals of ``valid_delta_base.mfmt`` (the base lies beside it)."""
    return _delta_on_base(_delta_high_step())


def i_delta_high_range() -> bytes:
    """A residual claiming 5 high bytes of a 4-byte element."""
    header, index, sections = split(v_delta_high(), columnar=True)
    header["delta"]["tensors"]["model"]["w"][2] = 5
    return assemble(header, sections, index=index, minor=4)


def _delta_edit(edit: Callable[[dict[str, Any]], None]) -> bytes:
    header, index, sections = split(v_delta(), columnar=True)
    edit(header["delta"]["base"])
    return assemble(header, sections, index=index, minor=3)


def i_delta_wrong_base() -> bytes:
    """The base beside it is not the file it was written against (another header checksum)."""
    return _delta_edit(lambda b: b.update(header_checksum=bytes(8)))


def i_delta_missing_base() -> bytes:
    return _delta_edit(lambda b: b.update(uri="valid_delta_gone.mfmt"))


def i_tree_device_index() -> bytes:
    return _with_metadata({"d": {"$device": "cuda:128"}})


def i_tree_device_leading_zero() -> bytes:
    return _with_metadata({"d": {"$device": "cuda:01"}})


def i_tree_device_type() -> bytes:
    return _with_metadata({"d": {"$device": "CUDA"}})


def i_tree_dtype_alias() -> bytes:
    return _with_metadata({"d": {"$dtype": "float"}})


def i_tree_missing_tensor() -> bytes:
    return _with_metadata({}, trees={"optimizer": {"w": {"$tensor": ["model", "missing"]}}})


def i_tree_bytes_name() -> bytes:
    return _with_metadata({}, trees={b"optimizer": {}})


VALID: dict[str, Callable[[], bytes]] = {
    "valid_all_dtypes": v_all_dtypes,
    "valid_empty_tensor": v_empty_tensor,
    "valid_scalar": v_scalar,
    "valid_tied": v_tied,
    "valid_zstd": v_zstd,
    "valid_zstd_multiframe": v_zstd_multiframe,
    "valid_zstd_planes": v_zstd_planes,
    "valid_metadata_tree": v_metadata_tree,
    "valid_object_tree": v_object_tree,
    "valid_newer_minor": v_newer_minor,
    "valid_columnar_index": v_columnar_index,
    "valid_future_minor": v_future_minor,
    "valid_msgpack_nesting_limit": v_msgpack_nesting_limit,
    "valid_tree_depth_limit": v_tree_depth_limit,
    "valid_tree_keys": v_tree_keys,
    "valid_object_defaults": v_object_defaults,
    "valid_delta_base": v_delta_base,
    "valid_delta": v_delta,
    "valid_delta_high": v_delta_high,
}

#: name -> (builder, expected error class, expected region)
INVALID: dict[str, tuple[Callable[[], bytes], str, str]] = {
    "invalid_bad_magic": (i_bad_magic, "BadMagicError", "preamble"),
    "invalid_unsupported_major": (i_unsupported_major, "UnsupportedVersionError", "preamble"),
    "invalid_must_understand": (i_must_understand, "UnsupportedVersionError", "header"),
    "invalid_header_duplicate_key": (i_header_duplicate_key, "HeaderError", "header"),
    "invalid_header_bool_as_int": (i_header_bool_as_int, "HeaderError", "section 'model'"),
    "invalid_layout_truncated": (i_layout_truncated, "LayoutError", "trailer"),
    "invalid_layout_tensor_hole": (i_layout_tensor_hole, "LayoutError", "section 'model'"),
    "invalid_limit_header_length": (i_limit_header_length, "LimitExceededError", "preamble"),
    "invalid_unknown_codec": (i_unknown_codec, "UnknownCodecError", "section 'model'"),
    "invalid_codec_bad_frame": (i_codec_bad_frame, "CodecError", "section 'model' frame 1"),
    "invalid_codec_frame_checksum": (i_codec_frame_checksum, "CodecError", "section 'model' frame 1"),
    "invalid_codec_plane_group": (i_codec_plane_group, "LayoutError", "section 'model' frame table"),
    "invalid_integrity_tensor": (i_integrity_tensor, "IntegrityError", "section 'model'"),
    "invalid_integrity_header": (i_integrity_header, "IntegrityError", "header"),
    "invalid_integrity_trailer_index": (i_integrity_trailer_index, "IntegrityError", "trailer index"),
    "invalid_msgpack_nesting": (i_msgpack_nesting, "HeaderError", "header"),
    "invalid_timestamp_unknown_key": (i_timestamp_unknown_key, "HeaderError", "header"),
    "invalid_timestamp_section_entry": (i_timestamp_section_entry, "HeaderError", "header"),
    "invalid_timestamp_trailer_index": (i_timestamp_trailer_index, "HeaderError", "trailer index"),
    "invalid_ext_codec_configuration": (i_ext_codec_configuration, "HeaderError", "header"),
    "invalid_bytes_key_codec_configuration": (i_bytes_key_codec_configuration, "HeaderError", "header"),
    "invalid_unknown_dtype_region": (i_unknown_dtype_region, "HeaderError", "section 'model'"),
    "invalid_columnar_unknown_dtype_code": (i_columnar_unknown_dtype_code, "HeaderError", "section 'model'"),
    "invalid_columnar_names_unterminated": (i_columnar_names_unterminated, "HeaderError", "section 'model'"),
    "invalid_columnar_short_column": (i_columnar_short_column, "HeaderError", "section 'model'"),
    "invalid_columnar_order_not_permutation": (i_columnar_order_not_permutation, "HeaderError", "section 'model'"),
    "invalid_columnar_alias_target": (i_columnar_alias_target, "HeaderError", "section 'model'"),
    "invalid_columnar_and_entries": (i_columnar_and_entries, "HeaderError", "section 'model'"),
    "invalid_trailer_tensor_order": (i_trailer_tensor_order, "IntegrityError", "trailer index"),
    "invalid_must_understand_first": (i_must_understand_first, "UnsupportedVersionError", "header"),
    "invalid_json_float_shape": (i_json_float_shape, "HeaderError", "section 'model' safetensors header"),
    "invalid_json_bool_offset": (i_json_bool_offset, "HeaderError", "section 'model' safetensors header"),
    "invalid_json_nan": (i_json_nan, "HeaderError", "section 'model' safetensors header"),
    "invalid_json_metadata_not_string": (i_json_metadata_not_string, "HeaderError",
                                         "section 'model' safetensors header"),
    "invalid_json_duplicate_key": (i_json_duplicate_key, "HeaderError", "section 'model' safetensors header"),
    "invalid_json_bom": (i_json_bom, "HeaderError", "section 'model' safetensors header"),
    "invalid_bool_byte": (i_bool_byte, "IntegrityError", "section 'model'"),
    "invalid_tree_depth": (i_tree_depth, "HeaderError", "header"),
    "invalid_tree_size_depth": (i_tree_size_depth, "HeaderError", "header"),
    "invalid_tree_key_collision": (i_tree_key_collision, "HeaderError", "header"),
    "invalid_tree_bool_int_key": (i_tree_bool_int_key, "HeaderError", "header"),
    "invalid_tree_nan_member": (i_tree_nan_member, "HeaderError", "header"),
    "invalid_tree_list_key": (i_tree_list_key, "HeaderError", "header"),
    "invalid_tree_hash_flood": (i_tree_hash_flood, "HeaderError", "header"),
    "invalid_tree_device_index": (i_tree_device_index, "HeaderError", "header"),
    "invalid_tree_device_leading_zero": (i_tree_device_leading_zero, "HeaderError", "header"),
    "invalid_tree_device_type": (i_tree_device_type, "HeaderError", "header"),
    "invalid_tree_dtype_alias": (i_tree_dtype_alias, "HeaderError", "header"),
    "invalid_tree_missing_tensor": (i_tree_missing_tensor, "HeaderError", "header"),
    "invalid_tree_bytes_name": (i_tree_bytes_name, "HeaderError", "header"),
    "invalid_delta_wrong_base": (i_delta_wrong_base, "BaseCheckpointError", "base identity"),
    "invalid_delta_missing_base": (i_delta_missing_base, "BaseCheckpointError", "base"),
    "invalid_delta_high_range": (i_delta_high_range, "HeaderError", "header"),
}

#: Vectors that name a base: the other vectors that must lie beside them when they are read.
NEEDS: dict[str, tuple[str, ...]] = {name: ("valid_delta_base",) for name in
                                     ("valid_delta", "invalid_delta_wrong_base", "invalid_delta_missing_base",
                                      "valid_delta_high", "invalid_delta_high_range")}


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _place_needed(name: str, directory: Path, where: Path) -> None:
    for needed in NEEDS.get(name, ()):
        (where / f"{needed}.mfmt").write_bytes((directory / f"{needed}.mfmt").read_bytes())


def main(directory: Path = HERE) -> list[str]:
    """Write every missing vector; return the names written."""
    written: list[str] = []
    for name, build in VALID.items():
        target = directory / f"{name}.mfmt"
        if target.exists():
            continue
        data = build()
        assert len(data) < MAX_VECTOR_SIZE, (name, len(data))
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d) / f"{name}.mfmt"
            tmp.write_bytes(data)
            _place_needed(name, directory, Path(d))
            expected = describe(tmp)
        target.write_bytes(data)
        _write_json(directory / f"{name}.expected.json", expected)
        written.append(name)
    for name, (build, error, region) in INVALID.items():
        target = directory / f"{name}.mfmt"
        if target.exists():
            continue
        data = build()
        assert len(data) < MAX_VECTOR_SIZE, (name, len(data))
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d) / f"{name}.mfmt"
            tmp.write_bytes(data)
            _place_needed(name, directory, Path(d))
            got = reader_error(tmp)
        if got != (error, region):
            raise AssertionError(f"{name}: the reader reports {got}, the vector intends {(error, region)}")
        target.write_bytes(data)
        _write_json(directory / f"{name}.expected.json", {"valid": False, "error": error, "region": region})
        written.append(name)
    return written


if __name__ == "__main__":
    os.chdir(ROOT)
    names = main()
    print(f"wrote {len(names)} vector(s)" + (": " + ", ".join(names) if names else ""))
