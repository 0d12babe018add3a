"""The msgpack header: strict decoding with limits, schema validation, and encoding.

Decoding follows msgpack-python's advice for untrusted input: one ``unpackb`` call per parse
(never a reused ``Unpacker``), size limits derived from the input, ``strict_map_key``,
duplicate keys rejected, and every ext type rejected. The decoded value is then validated
field by field; errors name the field path.
"""

from __future__ import annotations

import functools
import gc
import itertools
import math
import operator
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import msgpack

from mettaformat.constants import (
    CHECKSUM_NAMES,
    MAX_NAME_BYTES,
    MAX_RANK,
    MAX_SECTIONS,
    MAX_STREAM_HEADER_SIZE,
    MAX_TENSOR_BYTES,
    MAX_TENSORS_PER_SECTION,
    RESERVED_NAMES,
    STREAM_DATA_ALIGNMENT,
)
from mettaformat.dtypes import DTYPE_TAGS, dtype_from_tag, itemsize
from mettaformat.errors import HeaderError, LayoutError, LimitExceededError, UnsupportedVersionError

__all__ = ["Header", "SectionEntry", "TensorEntry", "decode_msgpack", "encode_msgpack", "parse_header", "parse_index"]

#: Extensions this reader implements; a file listing anything else in must_understand is refused.
KNOWN_EXTENSIONS: Final[frozenset[str]] = frozenset()


# -- msgpack ------------------------------------------------------------------------------------
_TIMESTAMP: Final = msgpack.Timestamp


def _no_timestamp(values: Any) -> None:
    # msgpack decodes ext type -1 (timestamp) itself and never calls ext_hook for it, so the hooks
    # reject the Timestamp objects it produces. ``in map(type, ...)`` keeps the scan in C.
    if _TIMESTAMP in map(type, values):
        raise HeaderError("msgpack ext type -1 (timestamp) is not allowed")


def _pairs_hook(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[Any] = set()
        for key, _ in pairs:
            if key in seen:
                raise HeaderError(f"duplicate map key {key!r}")
            seen.add(key)
    if bytes in map(type, out):  # strict_map_key lets str and bytes through; only str is allowed
        raise HeaderError(f"map key {next(k for k in out if type(k) is bytes)!r} is not a string")
    _no_timestamp(out.values())
    return out


def _list_hook(items: list[Any]) -> list[Any]:
    _no_timestamp(items)
    return items


def _ext_hook(code: int, data: bytes) -> Any:
    raise HeaderError(f"msgpack ext type {code} is not allowed")


def decode_msgpack(data: bytes | memoryview, *, region: str) -> Any:
    """Decode one msgpack value that must fill ``data`` exactly.

    Raises:
        HeaderError: malformed, truncated or trailing data, nesting too deep, non-string or
            duplicate keys, ext types, or invalid UTF-8.
    """
    try:
        # Fast path: decode in C without per-map callbacks, then re-encode. Equal bytes prove there
        # were no duplicate keys (every map's entry count is part of its encoding). Files from other
        # writers (non-minimal encodings, float32) take the checked path below, which is exact.
        # bytes keys and timestamps can pass here; the schema checks every map it reads (_Fields,
        # _columnar_entries) and decode_tree rejects them in free-form trees.
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, ext_hook=_ext_hook)
        if type(value) is dict and msgpack.packb(value, use_bin_type=True) == data:
            _no_timestamp((value,))
            return value
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_pairs_hook=_pairs_hook,
            list_hook=_list_hook,
            ext_hook=_ext_hook,
        )
        _no_timestamp((value,))
        return value
    except HeaderError as e:
        raise HeaderError(e.message, path=e.path, region=region) from None
    except msgpack.ExtraData as e:
        raise HeaderError(f"{len(e.extra)} trailing bytes after the msgpack value", region=region) from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        reason = str(e) or type(e).__name__  # StackError carries no message
        raise HeaderError(f"invalid msgpack: {reason}", region=region) from None


def encode_msgpack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True, strict_types=False)  # type: ignore[no-any-return]


# -- schema -------------------------------------------------------------------------------------
class TensorEntry(NamedTuple):
    """One tensor of a section. ``begin``/``end`` are offsets inside the stream's data region.

    A NamedTuple rather than a frozen dataclass: headers hold up to a million of these, and a
    tuple is built several times faster.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    checksum: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True, kw_only=True)
class SectionEntry:
    """One section: a safetensors byte stream stored with a codec."""

    name: str
    offset: int
    length: int
    codec: str
    configuration: dict[str, Any]
    stream_length: int
    stream_header_length: int
    stream_header_checksum: int
    tensors: tuple[TensorEntry, ...]
    #: alias name -> name of the tensor it shares storage with (tied weights).
    aliases: dict[str, str]
    #: every name in its original order (tensors and aliases interleaved as saved).
    order: tuple[str, ...]
    frames: bytes = b""

    @property
    def end(self) -> int:
        return self.offset + self.length

    def by_name(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}

    def to_msgpack(self) -> dict[str, Any]:
        entries: list[dict[str, Any]] = []
        by_name = self.by_name()
        for name in self.order:
            if name in self.aliases:
                entries.append({"name": name, "alias": self.aliases[name]})
                continue
            t = by_name[name]
            entries.append(
                {
                    "name": t.name,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "offsets": [t.begin, t.end],
                    "checksum": t.checksum.to_bytes(8, "little"),
                }
            )
        out: dict[str, Any] = {
            "name": self.name,
            "offset": self.offset,
            "length": self.length,
            "codec": {"name": self.codec, "configuration": self.configuration},
            "stream": {
                "length": self.stream_length,
                "header_length": self.stream_header_length,
                "header_checksum": self.stream_header_checksum.to_bytes(8, "little"),
            },
            "tensors": entries,
        }
        if self.frames:
            out["frames"] = self.frames
        return out


@dataclass(frozen=True, kw_only=True)
class Header:
    """The decoded header. ``metadata`` and ``trees`` are still in tagged (encoded) form."""

    file_length: int
    checksum: str
    sections: tuple[SectionEntry, ...]
    metadata: Any = None
    trees: dict[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> SectionEntry | None:
        for s in self.sections:
            if s.name == name:
                return s
        return None

    def index_msgpack(self) -> dict[str, Any]:
        """What the trailer repeats: everything needed to find and check the tensors."""
        return {
            "file_length": self.file_length,
            "checksum": self.checksum,
            "sections": [s.to_msgpack() for s in self.sections],
        }

    def to_msgpack(self) -> dict[str, Any]:
        out = self.index_msgpack()
        out["metadata"] = self.metadata
        out["trees"] = self.trees
        return out


class _Fields:
    """Typed access to a decoded map, with the field path in every error."""

    def __init__(self, value: Any, path: str, region: str) -> None:
        if not isinstance(value, dict):
            raise HeaderError(f"expected a map, found {type(value).__name__}", path=path, region=region)
        if bytes in map(type, value):
            raise HeaderError(f"map key {next(k for k in value if type(k) is bytes)!r} is not a string", path=path,
                              region=region)
        self.d, self.path, self.region = value, path, region

    def err(self, key: str, message: str) -> HeaderError:
        return HeaderError(message, path=f"{self.path}.{key}", region=self.region)

    def get(self, key: str, kind: type, *, required: bool = True, default: Any = None) -> Any:
        if key not in self.d:
            if required:
                raise self.err(key, "required field missing")
            return default
        v = self.d[key]
        # bool is an int subclass: a bool where an int is expected is a schema violation.
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise self.err(key, f"expected {kind.__name__}, found {type(v).__name__}")
        return v

    def uint(self, key: str) -> int:
        v: int = self.get(key, int)
        if not 0 <= v < 1 << 63:
            raise self.err(key, f"{v} is not a non-negative 63-bit integer")
        return v

    def checksum(self, key: str) -> int:
        v: bytes = self.get(key, bytes)
        if len(v) != 8:
            raise self.err(key, f"checksum must be 8 bytes, found {len(v)}")
        return int.from_bytes(v, "little")


def _check_name(name: str, path: str, region: str) -> None:
    if not name or len(name.encode()) > MAX_NAME_BYTES or "\x00" in name or name in RESERVED_NAMES:
        raise HeaderError(
            f"invalid tensor name {name!r} (empty, NUL, reserved or over {MAX_NAME_BYTES} bytes)",
            path=path,
            region=region,
        )


def _parse_shape(f: _Fields, tag: str) -> tuple[tuple[int, ...], int]:
    shape = f.get("shape", list)
    if len(shape) > MAX_RANK:
        raise LimitExceededError("tensor rank", len(shape), MAX_RANK, region=f.region)
    nbytes = nonzero = itemsize(tag)
    for i, dim in enumerate(shape):
        if type(dim) is not int or not 0 <= dim < 1 << 63:
            raise f.err(f"shape[{i}]", f"dimension {dim!r} is not an integer in [0, 2^63)")
        nbytes *= dim
        # Python ints cannot overflow; bound the product instead, ignoring zeros so that a huge
        # dimension next to a zero one (an empty tensor torch cannot even describe) is refused too.
        nonzero *= dim or 1
        if nonzero > MAX_TENSOR_BYTES:
            raise f.err("shape", f"tensor size overflows the {MAX_TENSOR_BYTES}-byte limit")
    return tuple(shape), nbytes


_INT63: Final = 1 << 63
_ITEMSIZES: Final = {tag: itemsize(tag) for tag in DTYPE_TAGS}


def _fast_entry(item: Any, seen: set[str]) -> TensorEntry | None:
    """Validate a well-formed data entry with a few cheap checks; None sends it to the detailed path.

    Opening a file parses every entry, so this loop is what "open in a millisecond" costs; the
    slow path re-checks the same rules one by one to produce a precise error.
    """
    if type(item) is not dict or "alias" in item or bytes in map(type, item):
        return None
    name, tag, shape, offsets, digest = (item.get("name"), item.get("dtype"), item.get("shape"), item.get("offsets"),
                                         item.get("checksum"))
    size = _ITEMSIZES.get(tag) if type(tag) is str else None
    if (size is None or type(name) is not str or not name or name in seen or "\x00" in name
            or name in RESERVED_NAMES or (len(name) * 4 > MAX_NAME_BYTES and len(name.encode()) > MAX_NAME_BYTES)
            or type(shape) is not list or len(shape) > MAX_RANK or type(offsets) is not list or len(offsets) != 2
            or type(digest) is not bytes or len(digest) != 8):
        return None
    nbytes = nonzero = size
    for dim in shape:
        if type(dim) is not int or dim < 0 or dim >= _INT63:
            return None
        nbytes *= dim
        nonzero *= dim or 1
    begin, end = offsets
    if (nonzero > MAX_TENSOR_BYTES or type(begin) is not int or type(end) is not int or begin < 0
            or end >= _INT63 or end - begin != nbytes or begin % size):
        return None
    return TensorEntry(name, str(tag), tuple(shape), begin, end, int.from_bytes(digest, "little"))


_checksum_int: Final = functools.partial(int.from_bytes, byteorder="little")
_new_entry: Final = functools.partial(tuple.__new__, TensorEntry)


def _columnar_entries(raw: list[Any]) -> list[TensorEntry] | None:
    """Validate a section's entries column by column, with the loops in C (map, set, zip).

    This is the common case (well-formed entries, no aliases) at about 1 µs per tensor, a third
    of the per-entry path. Any doubt returns None, and the per-entry path finds the exact error.
    """
    if not raw or set(map(type, raw)) != {dict} or any(map(operator.methodcaller("__contains__", "alias"), raw)):
        return None
    if bytes in map(type, set(itertools.chain.from_iterable(raw))):  # every key of every entry, in C
        return None
    try:
        names = list(map(operator.itemgetter("name"), raw))
        tags = list(map(operator.itemgetter("dtype"), raw))
        shapes = list(map(operator.itemgetter("shape"), raw))
        offsets = list(map(operator.itemgetter("offsets"), raw))
        digests = list(map(operator.itemgetter("checksum"), raw))
    except KeyError:
        return None
    if (set(map(type, names)) != {str} or len(set(names)) != len(names) or not RESERVED_NAMES.isdisjoint(names)
            or "\x00" in "".join(names) or min(map(len, names)) == 0
            or max(map(len, names)) * 4 > MAX_NAME_BYTES
            or not set(tags) <= _ITEMSIZES.keys() or set(map(type, shapes)) != {list}
            or max(map(len, shapes)) > MAX_RANK or set(map(type, offsets)) != {list} or set(map(len, offsets)) != {2}
            or set(map(type, digests)) != {bytes} or set(map(len, digests)) != {8}):
        return None
    dims = [d for shape in shapes for d in shape]
    if dims and (not set(map(type, dims)) <= {int} or min(dims) < 0 or max(dims) >= _INT63):
        return None
    sizes = list(map(_ITEMSIZES.__getitem__, tags))
    nonzero = list(map(operator.mul, sizes, map(math.prod, map(functools.partial(filter, None), shapes))))
    if max(nonzero) > MAX_TENSOR_BYTES:
        return None
    nbytes = list(map(operator.mul, sizes, map(math.prod, shapes)))
    begins = list(map(operator.itemgetter(0), offsets))
    ends = list(map(operator.itemgetter(1), offsets))
    if (not set(map(type, begins)) | set(map(type, ends)) <= {int} or min(begins) < 0 or max(ends) >= _INT63
            or list(map(operator.sub, ends, begins)) != nbytes or any(map(operator.mod, begins, sizes))):
        return None
    # tuple.__new__ builds each NamedTuple in C (TensorEntry(...) would run Python code per entry).
    columns = zip(names, tags, map(tuple, shapes), begins, ends, map(_checksum_int, digests), strict=True)
    return list(map(_new_entry, columns))


def _parse_tensors(raw: list[Any], path: str, region: str) -> tuple[list[TensorEntry], dict[str, str], list[str]]:
    if len(raw) > MAX_TENSORS_PER_SECTION:
        raise LimitExceededError("tensor count", len(raw), MAX_TENSORS_PER_SECTION, region=region)
    fast = _columnar_entries(raw)
    if fast is not None:
        return fast, {}, [t.name for t in fast]
    tensors: list[TensorEntry] = []
    aliases: dict[str, str] = {}
    order: list[str] = []
    seen: set[str] = set()  # ``name in order`` would make a header of n names cost O(n**2)
    for i, item in enumerate(raw):
        entry = _fast_entry(item, seen)
        if entry is not None:
            seen.add(entry.name)
            order.append(entry.name)
            tensors.append(entry)
            continue
        f = _Fields(item, f"{path}[{i}]", region)
        name = f.get("name", str)
        _check_name(name, f"{path}[{i}].name", region)
        if name in seen:
            raise HeaderError(f"duplicate tensor name {name!r}", path=f"{path}[{i}].name", region=region)
        seen.add(name)
        order.append(name)
        if "alias" in f.d:
            aliases[name] = f.get("alias", str)
            continue
        tag = f.get("dtype", str)
        dtype_from_tag(tag, path=f"{path}[{i}].dtype")
        shape, nbytes = _parse_shape(f, tag)
        offsets = f.get("offsets", list)
        if len(offsets) != 2 or not all(type(o) is int and 0 <= o < 1 << 63 for o in offsets):
            raise f.err("offsets", "expected [begin, end] non-negative integers")
        begin, end = offsets
        if end - begin != nbytes:
            raise f.err("offsets", f"[{begin}, {end}] holds {end - begin} bytes, shape and dtype need {nbytes}")
        if begin % itemsize(tag):
            raise f.err("offsets", f"begin {begin} is not aligned to the {itemsize(tag)}-byte element size")
        tensors.append(
            TensorEntry(name=name, dtype=tag, shape=shape, begin=begin, end=end, checksum=f.checksum("checksum"))
        )
    data_names = {t.name for t in tensors}
    for alias, target in aliases.items():
        if target not in data_names:
            raise HeaderError(
                f"alias {alias!r} points to {target!r}, which is not a stored tensor", path=path, region=region
            )
    return tensors, aliases, order


_by_offsets: Final = operator.itemgetter(3, 4)  # (begin, end) of a TensorEntry


def _check_coverage(tensors: list[TensorEntry], data_length: int, path: str, region: str) -> list[TensorEntry]:
    """Tensors must tile the data region exactly: no overlap (tied data is an alias), no holes."""
    ordered = sorted(tensors, key=_by_offsets)
    position = 0
    for t in ordered:
        if t.begin != position:
            kind = "overlaps the previous tensor" if t.begin < position else f"leaves a hole after offset {position}"
            raise LayoutError(f"tensor {t.name!r} at [{t.begin}, {t.end}] {kind}", region=region)
        position = t.end
    if position != data_length:
        raise LayoutError(f"tensors cover {position} bytes of a {data_length}-byte data region", region=region)
    return ordered


def _parse_section(raw: Any, path: str) -> SectionEntry:
    f = _Fields(raw, path, "header")
    name = f.get("name", str)
    region = f"section {name!r}"
    if not name or len(name.encode()) > MAX_NAME_BYTES:
        raise f.err("name", "section name must be 1 to 4096 bytes")
    codec = _Fields(f.get("codec", dict), f"{path}.codec", region)
    stream = _Fields(f.get("stream", dict), f"{path}.stream", region)
    header_length = stream.uint("header_length")
    if not 8 < header_length <= MAX_STREAM_HEADER_SIZE + 8 or header_length % STREAM_DATA_ALIGNMENT:
        raise stream.err(
            "header_length",
            f"{header_length} is not a multiple of {STREAM_DATA_ALIGNMENT} in (8, {MAX_STREAM_HEADER_SIZE + 8}]",
        )
    stream_length = stream.uint("length")
    if stream_length < header_length:
        raise stream.err("length", f"stream length {stream_length} is shorter than its header ({header_length})")
    tensors, aliases, order = _parse_tensors(f.get("tensors", list), f"{path}.tensors", region)
    ordered = _check_coverage(tensors, stream_length - header_length, path, region)
    return SectionEntry(
        name=name,
        offset=f.uint("offset"),
        length=f.uint("length"),
        codec=codec.get("name", str),
        configuration=codec.get("configuration", dict, required=False, default={}),
        stream_length=stream_length,
        stream_header_length=header_length,
        stream_header_checksum=stream.checksum("header_checksum"),
        tensors=tuple(ordered),
        aliases=aliases,
        order=tuple(order),
        frames=f.get("frames", bytes, required=False, default=b""),
    )


def _parse_sections(f: _Fields) -> tuple[int, str, tuple[SectionEntry, ...]]:
    file_length = f.uint("file_length")
    algorithm = f.get("checksum", str)
    if algorithm not in CHECKSUM_NAMES:
        raise f.err("checksum", f"unknown checksum algorithm {algorithm!r}; known: {', '.join(CHECKSUM_NAMES)}")
    raw_sections = f.get("sections", list)
    if len(raw_sections) > MAX_SECTIONS:
        raise LimitExceededError("section count", len(raw_sections), MAX_SECTIONS, region=f.region)
    sections = tuple(_parse_section(s, f"{f.path}.sections[{i}]") for i, s in enumerate(raw_sections))
    names = [s.name for s in sections]
    if len(set(names)) != len(names):
        raise f.err("sections", "duplicate section names")
    return file_length, algorithm, sections


def parse_header(data: bytes | memoryview) -> Header:
    """Decode and validate the header bytes (after their checksum was verified).

    Raises:
        HeaderError, LimitExceededError, LayoutError, UnsupportedVersionError.
    """
    with _gc_paused():
        return _parse_header(data)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Parsing allocates many small objects and no cycles; letting the cyclic collector run over the
    growing header on every allocation threshold tripled the cost of opening a file."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _parse_header(data: bytes | memoryview) -> Header:
    f = _Fields(decode_msgpack(data, region="header"), "header", "header")
    must = f.get("must_understand", list, required=False, default=[])
    for i, m in enumerate(must):
        # A list or map here would make the set lookup below raise TypeError (unhashable).
        if not isinstance(m, str):
            raise f.err(f"must_understand[{i}]", f"expected str, found {type(m).__name__}")
    unknown = [m for m in must if m not in KNOWN_EXTENSIONS]
    if unknown:
        raise UnsupportedVersionError(
            f"file requires extensions this reader lacks: {unknown}",
            found=unknown,
            supported=sorted(KNOWN_EXTENSIONS),
            region="header",
        )
    file_length, algorithm, sections = _parse_sections(f)
    trees = f.get("trees", dict, required=False, default={})
    return Header(
        file_length=file_length, checksum=algorithm, sections=sections, metadata=f.d.get("metadata"), trees=trees
    )


def parse_index(data: bytes | memoryview) -> Header:
    """Decode the trailer's copy of the section index (a header without metadata or trees)."""
    with _gc_paused():
        return _parse_index(data)


def _parse_index(data: bytes | memoryview) -> Header:
    f = _Fields(decode_msgpack(data, region="trailer index"), "index", "trailer index")
    file_length, algorithm, sections = _parse_sections(f)
    return Header(file_length=file_length, checksum=algorithm, sections=sections)


def iter_regions(header: Header) -> Iterator[tuple[str, int, int]]:
    """(region, start, end) of every section, in file order."""
    for s in sorted(header.sections, key=lambda s: s.offset):
        yield f"section {s.name!r}", s.offset, s.end
