"""Classes of header defects, each tested as a class: wrong-typed values anywhere in the schema, ext types
and bin keys anywhere in the msgpack, an embedded JSON header safetensors would refuse, and the two forms
of the tensor index (columnar, per-entry) meaning the same thing."""

from __future__ import annotations

import copy
import random
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import safetensors.torch
import torch

import mettaformat
from mettaformat.container.header import parse_header, parse_index
from mettaformat.container.stream_json import parse_stream_json
from mettaformat.container.tensor_index import (
    TensorEntry,
    columns_from_entries,
    section_to_entries_form,
    to_map,
)
from mettaformat.errors import FormatError, HeaderError, MettaFormatError


def _header_bytes(columnar: bool) -> bytes:
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    data = mettaformat.save({"w": w, "tied": w, "b": torch.ones(3, dtype=torch.int8), "s": torch.tensor(1.0)},
                            metadata={"epoch": 1, "nested": {"a": [1, 2]}})
    (length,) = struct.unpack_from("<Q", data, 16)
    header = msgpack.unpackb(data[32:32 + length], raw=False)
    if not columnar:
        for s in header["sections"]:
            section_to_entries_form(s)
    return msgpack.packb(header, use_bin_type=True)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a decoded header: map values and array items, at every depth."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*path, k)
            yield from _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield (*path, i)
            yield from _paths(v, (*path, i))


def _set(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    out = copy.deepcopy(value)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return out


WRONG_TYPES = [None, True, 1.5, -1, 2**64 - 1, "F32", b"\x00" * 8, [], {}, ["F32"], {"name": "x"}, [[1]]]


@pytest.mark.parametrize("columnar", [True, False], ids=["3.1", "3.0"])
def test_header_values_of_wrong_type_end_in_format_errors(columnar: bool) -> None:
    """Any schema field holding a value of any other type is a FormatError, never a TypeError, KeyError or
    AttributeError from a membership test made before the type check."""
    header = msgpack.unpackb(_header_bytes(columnar), raw=False)
    places = [p for p in _paths(header) if p[0] not in ("metadata", "trees")]
    assert len(places) > 20
    for place in places:
        for wrong in WRONG_TYPES:
            data = msgpack.packb(_set(header, place, wrong), use_bin_type=True)
            for parse in (parse_header, parse_index):
                try:
                    parse(data)
                except FormatError:
                    pass
                except Exception as e:
                    pytest.fail(f"{parse.__name__} {place} = {wrong!r}: {type(e).__name__}: {e}")


RAW_VALUES = {
    "timestamp": msgpack.packb(msgpack.Timestamp(1, 0)),
    "ext": msgpack.packb(msgpack.ExtType(5, b"x")),
    "bin key": msgpack.packb({b"k": 1}, use_bin_type=True),
    "nested timestamp": msgpack.packb([{"a": msgpack.Timestamp(0, 1)}]),
}


@pytest.mark.parametrize("kind", sorted(RAW_VALUES))
def test_ext_types_and_bin_keys_are_refused_at_open_anywhere(kind: str) -> None:
    """Unknown keys, codec configurations, stream maps, the index map, metadata: the strict decoder
    refuses ext types, timestamps and bin keys in all of them, before any value is used."""
    header = msgpack.unpackb(_header_bytes(True), raw=False)
    maps = [p for p in _paths(header) if isinstance(_get(header, p), dict)] + [()]
    assert len(maps) >= 8
    marker = msgpack.packb("@@X@@")
    for place in maps:
        edited = copy.deepcopy(header)
        target = _get(edited, place)
        target["x_unknown"] = "@@X@@"
        data = msgpack.packb(edited, use_bin_type=True).replace(marker, RAW_VALUES[kind])
        with pytest.raises(HeaderError) as info:
            parse_header(data)
        assert info.value.region == "header", place


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        value = value[key]
    return value


def _stream(json_bytes: bytes, data: bytes = b"\x00" * 4) -> bytes:
    body = json_bytes + b" " * (-(8 + len(json_bytes)) % 8)
    return struct.pack("<Q", len(body)) + body + data


ENTRY = b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
JSON_CASES = {
    "plain": b"{" + ENTRY + b"}",
    "metadata": b'{"__metadata__":{"format":"pt"},' + ENTRY + b"}",
    "leading space": b" {" + ENTRY + b"}",
    "bom": b"\xef\xbb\xbf{" + ENTRY + b"}",
    "utf-16": ("{" + ENTRY.decode() + "}").encode("utf-16-le"),
    "float dim": b'{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}',
    "exponent dim": b'{"a":{"dtype":"F32","shape":[1e0],"data_offsets":[0,4]}}',
    "negative zero": b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,4]}}',
    "bool dim": b'{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}',
    "bool offset": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[false,4]}}',
    "nan": b'{"__metadata__":{"x":NaN},' + ENTRY + b"}",
    "metadata int": b'{"__metadata__":{"x":1},' + ENTRY + b"}",
    "metadata float": b'{"__metadata__":{"x":"y"},' + ENTRY + b',"z":1.5}',
    "lone surrogate": b'{"__metadata__":{"x":"\\ud800"},' + ENTRY + b"}",
    "control character": b'{"a\x01":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    "trailing nul": b"{" + ENTRY + b"}\x00",
    "duplicate field": b'{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    "duplicate tensor": b"{" + ENTRY + b"," + ENTRY + b"}",
    "duplicate metadata": b'{"__metadata__":{"x":"1","x":"2"},' + ENTRY + b"}",
    "unknown field": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}',
    "not an object": b"[1]",
    "largest dim": b"{" + ENTRY + b',"e":{"dtype":"F32","shape":[0,9223372036854775807],"data_offsets":[4,4]}}',
    "dim 2^63": b"{" + ENTRY + b',"e":{"dtype":"F32","shape":[0,9223372036854775808],"data_offsets":[4,4]}}',
    "dim 2^64": b"{" + ENTRY + b',"e":{"dtype":"F32","shape":[0,18446744073709551616],"data_offsets":[4,4]}}',
    "offset 2^64": b"{" + ENTRY + b',"e":{"dtype":"F32","shape":[0],"data_offsets":[4,18446744073709551616]}}',
}
#: refused here although safetensors 0.8 reads them: this format is stricter, never more lenient
STRICTER = {"duplicate tensor", "duplicate metadata", "unknown field", "leading space"}


@pytest.mark.parametrize("case", sorted(JSON_CASES))
def test_stream_json_is_never_more_lenient_than_safetensors(case: str) -> None:
    text = JSON_CASES[case]
    try:
        safetensors.torch.load(_stream(text))
        safetensors_reads = True
    except Exception:
        safetensors_reads = False
    try:
        parse_stream_json(text, region="r")
        ours = True
    except HeaderError:
        ours = False
    assert not ours or safetensors_reads, f"{case}: accepted here, refused by safetensors"
    assert ours == (safetensors_reads and case not in STRICTER), case


def _random_index(rng: random.Random) -> tuple[list[TensorEntry], dict[str, str], list[str]]:
    tags = ["F32", "I8", "BOOL", "BF16", "I64", "F8_E4M3", "C64"]
    sizes = {"F32": 4, "I8": 1, "BOOL": 1, "BF16": 2, "I64": 8, "F8_E4M3": 1, "C64": 8}
    entries, position = [], 0
    for i in range(rng.randint(0, 12)):
        tag = rng.choice(tags)
        shape = tuple(rng.choice([0, 1, 2, 3, 5]) for _ in range(rng.randint(0, 3)))
        nbytes = sizes[tag] * int(torch.Size(shape).numel())
        position = -(-position // sizes[tag]) * sizes[tag]
        entries.append(TensorEntry(f"t{i}", tag, shape, position, position + nbytes, rng.getrandbits(64)))
        position += nbytes
    rng.shuffle(entries)
    aliases = {f"a{k}": rng.choice(entries).name for k in range(rng.randint(0, 2))} if entries else {}
    order = [e.name for e in entries] + list(aliases)
    rng.shuffle(order)
    return entries, aliases, order


def _mutate(rng: random.Random, entries: list[TensorEntry], aliases: dict[str, str]) -> list[TensorEntry]:
    """One random edit of well-typed values that may break a rule: a name, a dtype, a dimension, an offset
    or an alias target."""
    if not entries:
        return entries
    i = rng.randrange(len(entries))
    e = entries[i]
    field = rng.choice(["name", "dtype", "shape", "begin", "end", "alias"])
    if field == "alias" and aliases:
        aliases[rng.choice(sorted(aliases))] = rng.choice(["missing", *aliases, e.name])
    elif field == "name":
        e = e._replace(name=rng.choice(["", "x\x00y", "__metadata__", "é" * 2049, entries[0].name, "a0"]))
    elif field == "dtype":
        e = e._replace(dtype=rng.choice(["X9", "F16", "BOOL", "U64"]))
    elif field == "shape":
        e = e._replace(shape=rng.choice([(-1,), (2**63,), (2**64 + 1,), (0, 2**62), (2**31, 2**31, 4), (1,) * 65,
                                         (*e.shape, 2)]))
    else:
        field = "end" if field == "alias" else field
        e = e._replace(**{field: rng.choice([-1, 0, 1, 3, 2**63, 2**64 - 1, getattr(e, field) + 1])})
    return [*entries[:i], e, *entries[i + 1:]]


def _per_entry(entries: list[TensorEntry], aliases: dict[str, str], order: list[str]) -> list[dict[str, Any]]:
    """The 3.0 form written out directly (not through the columns), values as they are."""
    by_name: dict[str, dict[str, Any]] = {a: {"name": a, "alias": t} for a, t in aliases.items()}
    for e in entries:
        by_name.setdefault(e.name, {"name": e.name, "dtype": e.dtype, "shape": list(e.shape),
                                    "offsets": [e.begin, e.end], "checksum": e.checksum.to_bytes(8, "little")})
    return [by_name[n] for n in order if n in by_name]


def _section(form: dict[str, Any], data_length: int) -> bytes:
    section = {"name": "model", "offset": 4096, "length": 64 + data_length, "codec": {"name": "raw"},
               "stream": {"length": 64 + data_length, "header_length": 64, "header_checksum": bytes(8)}, **form}
    return msgpack.packb({"file_length": 0, "checksum": "xxh3-64", "sections": [section]}, use_bin_type=True)


def _outcome(data: bytes) -> Any:
    try:
        header = parse_index(data)
    except MettaFormatError as e:
        return type(e).__name__
    for s in header.sections:  # the entries built from whole columns are those built one by one
        one_by_one = (s.index.entry(i) for i in range(len(s.index.columns.names)))
        assert s.index.tensors == tuple(sorted(one_by_one, key=lambda e: (e.begin, e.end)))
    return header.index_key()


def test_columnar_and_per_entry_forms_agree() -> None:
    """Differential: the same index stored as columns (3.1) and as one map per tensor (3.0) is accepted
    or refused alike, with the same error class, and parses to the same entries."""
    rng = random.Random(3)
    accepted = refused = 0
    for _ in range(600):
        entries, aliases, order = _random_index(rng)
        data_length = max((e.end for e in entries), default=0)
        if rng.random() < 0.6:
            entries = _mutate(rng, entries, aliases)
        names = [e.name for e in entries]
        if len(set(names)) != len(names) or set(names) & set(aliases):
            continue  # the two forms cannot say "two entries, one name" alike; tested by the vectors
        order = [n if n in names or n in aliases else names[0] for n in order]
        order = list(dict.fromkeys(order + names + list(aliases)))
        try:
            per_entry = _outcome(_section({"tensors": _per_entry(entries, aliases, order)}, data_length))
        except OverflowError:
            continue  # beyond what msgpack integers hold: no file can say it
        columnar = _outcome(_section({"index": to_map(columns_from_entries(entries, aliases, order))}, data_length))
        if isinstance(per_entry, str) and per_entry == "HeaderError" and any(
                not 0 <= d < 1 << 64 for e in entries for d in (*e.shape, e.begin, e.end)):
            refused += 1  # a value no u64 column can hold: only the per-entry form can even say it
            continue
        assert per_entry == columnar
        accepted += not isinstance(per_entry, str)
        refused += isinstance(per_entry, str)
    assert accepted > 50 and refused > 50


@pytest.mark.parametrize("aliases", ['{"w": "b"}', '{"x": "y", "y": "w"}', '{"x": "missing"}', '{"x": 1}',
                                     '["w"]', "{", '{"x": "w", "x": "b"}', '{"x": NaN}'])
def test_safetensors_aliases_never_replace_or_invent_tensors(aliases: str, tmp_path: Any) -> None:
    """A .safetensors input's ``mettaformat.aliases`` may only add names tied to stored tensors."""
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2), "b": torch.zeros(2)}, str(path),
                                metadata={"mettaformat.aliases": aliases})
    with pytest.raises(FormatError, match="alias"):
        mettaformat.load_any(path)


def test_safetensors_aliases_are_restored(tmp_path: Any) -> None:
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path), metadata={"mettaformat.aliases": '{"tied": "w"}'})
    tensors = mettaformat.load_any(path).tensors
    assert tensors["tied"] is tensors["w"]


def test_both_size_paths_agree_with_the_rule() -> None:
    """Differential: tensor sizes come from a direct product when no size can reach the limit, else from
    a float screen plus exact integers; both agree with the rule computed in Python integers."""
    from mettaformat.constants import MAX_TENSOR_BYTES
    from mettaformat.container import tensor_index

    rng = random.Random(5)
    sizes = {"F32": 4, "I8": 1, "F64": 8}
    for _ in range(300):
        big = rng.random() < 0.5
        entries, position = [], 0
        for i in range(rng.randint(1, 6)):
            tag = rng.choice(sorted(sizes))
            shape = tuple(rng.choice([0, 1, 3, 2**20, 2**31, 2**40] if big else [0, 1, 2, 7]) for _ in
                          range(rng.randint(0, 4)))
            nonzero = sizes[tag]
            for d in shape:
                nonzero *= d or 1
            nbytes = 0 if 0 in shape else nonzero
            entries.append(TensorEntry(f"t{i}", tag, shape, position, position + nbytes, 0))
            position += nbytes
        cols = columns_from_entries(entries, {}, [e.name for e in entries])
        item = tensor_index._ITEMSIZE_BY_CODE[cols.codes]
        too_big = any(math_prod_nonzero(e.shape) * sizes[e.dtype] > MAX_TENSOR_BYTES for e in entries)
        if too_big:
            with pytest.raises(HeaderError, match="overflows"):
                tensor_index._sizes(cols, item, "r")
            continue
        nbytes, starts = tensor_index._sizes(cols, item, "r")
        ext = np.concatenate((cols.dims, np.ones(1, np.uint64)))
        bounded = tensor_index._bounded_sizes(cols, ext, starts[:-1], starts, item, "r")
        bounded[cols.ranks == 0] = item[cols.ranks == 0]
        assert nbytes.tolist() == bounded.tolist() == [e.end - e.begin for e in entries]


def math_prod_nonzero(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d or 1
    return out
