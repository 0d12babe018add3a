"""The msgpack header and trailer index: the schema of §4, field by field, with the path in every error.

Decoding is :mod:`strict_msgpack` (every map and array checked, at every depth); the tensor
index of each section is handed to :mod:`tensor_index`, which holds its rules once, whether the
file stores it as columns (3.1) or as one map per tensor (3.0).

Error regions: a violation inside a section entry (its fields, ``codec``, ``stream`` and tensor
index) reports ``section 'NAME'`` once the entry's name has been read; anything else reports
``header``. Every error found while parsing the trailer index reports ``trailer index``.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

from mettaformat.constants import (
    CHECKSUM_NAMES,
    MAX_NAME_BYTES,
    MAX_SECTIONS,
    MAX_STREAM_HEADER_SIZE,
    MAX_TENSORS_PER_SECTION,
    STREAM_DATA_ALIGNMENT,
)
from mettaformat.container.delta import DELTA_EXTENSION, DeltaInfo, parse_delta, stored_tag
from mettaformat.container.strict_msgpack import decode_msgpack, encode_msgpack
from mettaformat.container.tensor_index import (
    TensorEntry,
    TensorIndex,
    columns_from_entries,
    columns_from_map,
    to_map,
    validate,
)
from mettaformat.errors import HeaderError, LimitExceededError, UnsupportedVersionError

__all__ = ["COLUMNAR_INDEX", "Header", "SectionEntry", "TensorEntry", "decode_msgpack", "encode_msgpack",
           "parse_header", "parse_header_metadata", "parse_index"]

#: The extension a 3.1 writer lists in ``must_understand``: a 3.0 reader cannot read a columnar
#: index and must say so instead of misreading the file.
COLUMNAR_INDEX: Final = "mettaformat.columnar_index"
#: Extensions this reader implements; a file listing anything else in must_understand is refused.
KNOWN_EXTENSIONS: Final[frozenset[str]] = frozenset({COLUMNAR_INDEX, DELTA_EXTENSION})


@dataclass(frozen=True, kw_only=True)
class SectionEntry:
    """One section: a safetensors byte stream stored with a codec, and its tensor index."""

    name: str
    offset: int
    length: int
    codec: str
    configuration: dict[str, Any]
    stream_length: int
    stream_header_length: int
    stream_header_checksum: int
    index: TensorIndex
    frames: bytes = b""

    @classmethod
    def from_entries(cls, *, tensors: tuple[TensorEntry, ...], aliases: dict[str, str], order: tuple[str, ...],
                     **fields: Any) -> SectionEntry:
        """A section from tensor entries (a writer's plan), checked by the same rules a reader applies."""
        region = f"section {fields['name']!r}"
        index = validate(columns_from_entries(tensors, aliases, order), fields["stream_length"] -
                         fields["stream_header_length"], region)
        return cls(index=index, **fields)

    @property
    def tensors(self) -> tuple[TensorEntry, ...]:
        """Every data entry, in data order (built on first use)."""
        return self.index.tensors

    @property
    def aliases(self) -> dict[str, str]:
        """Alias name -> name of the tensor it shares storage with (tied weights)."""
        return self.index.aliases

    @property
    def order(self) -> tuple[str, ...]:
        """Every name in its saved order (tensors and aliases interleaved)."""
        return self.index.order

    @property
    def end(self) -> int:
        return self.offset + self.length

    def by_name(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}

    def key(self) -> tuple[Any, ...]:
        """What the trailer index must repeat (codec configuration is not compared, §4.6)."""
        return (self.name, self.offset, self.length, self.codec, self.stream_length, self.stream_header_length,
                self.stream_header_checksum, self.frames, self.index.key())

    def to_msgpack(self) -> dict[str, Any]:
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
            "index": to_map(self.index.columns),
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
    #: the base and the tensors stored as differences from it (3.3), or None for a standalone file
    delta: DeltaInfo | None = None

    def section(self, name: str) -> SectionEntry | None:
        for s in self.sections:
            if s.name == name:
                return s
        return None

    def index_key(self) -> tuple[Any, ...]:
        """The header's index as parsed, to compare with the trailer's (§4.6)."""
        return self.file_length, self.checksum, tuple(s.key() for s in self.sections)

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
        out["must_understand"] = [COLUMNAR_INDEX]
        if self.delta is not None:
            out["delta"] = self.delta.to_msgpack()
            out["must_understand"].append(DELTA_EXTENSION)
        return out


class _Fields:
    """Typed access to a decoded map, with the field path in every error. Types are checked before
    any value is used (a list where a str belongs never reaches a set lookup)."""

    def __init__(self, value: Any, path: str, region: str) -> None:
        if type(value) is not dict:
            raise HeaderError(f"expected a map, found {type(value).__name__}", path=path, region=region)
        self.d, self.path, self.region = value, path, region

    def err(self, key: str, message: str) -> HeaderError:
        return HeaderError(message, path=f"{self.path}.{key}", region=self.region)

    def get(self, key: str, kind: type, *, required: bool = True, default: Any = None) -> Any:
        if key not in self.d:
            if required:
                raise self.err(key, "required field missing")
            return default
        v = self.d[key]
        # Exact types: a bool is never an int here, and nothing else is a subclass msgpack makes.
        if type(v) is not kind:
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


def _entries_30(raw: list[Any], path: str, region: str) -> tuple[list[TensorEntry], dict[str, str], list[str]]:
    """Type-check a 3.0 index (one map per tensor) and turn it into entries; the value rules are
    checked afterwards, on columns, by the same code as a 3.1 index."""
    if len(raw) > MAX_TENSORS_PER_SECTION:  # before building anything per entry
        raise LimitExceededError("tensor count", len(raw), MAX_TENSORS_PER_SECTION, region=region)
    entries: list[TensorEntry] = []
    aliases: dict[str, str] = {}
    order: list[str] = []
    for i, item in enumerate(raw):
        f = _Fields(item, f"{path}[{i}]", region)
        name = f.get("name", str)
        order.append(name)
        if "alias" in f.d:
            if name in aliases:
                raise f.err("name", f"duplicate tensor name {name!r}")
            aliases[name] = f.get("alias", str)
            continue
        shape = f.get("shape", list)
        for k, dim in enumerate(shape):
            if type(dim) is not int:
                raise f.err(f"shape[{k}]", f"dimension {dim!r} is not an integer in [0, 2^63)")
        offsets = f.get("offsets", list)
        if len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise f.err("offsets", "expected [begin, end] integers")
        entries.append(TensorEntry(name, f.get("dtype", str), tuple(shape), offsets[0], offsets[1],
                                   f.checksum("checksum")))
    return entries, aliases, order


def _index(f: _Fields, data_length: int, path: str, region: str) -> TensorIndex:
    if "index" in f.d and "tensors" in f.d:
        raise f.err("index", "a section has either 'index' (3.1) or 'tensors' (3.0), not both")
    if "index" in f.d:
        columns = _Fields(f.get("index", dict), f"{path}.index", region)
        cols = columns_from_map(lambda key, required: columns.get(key, bytes, required=required), f"{path}.index",
                                region)
        return validate(cols, data_length, region)
    entries, aliases, order = _entries_30(f.get("tensors", list), f"{path}.tensors", region)
    alias_names = list(aliases)
    position = {name: i for i, name in enumerate(order)}

    def where(i: int, field_name: str) -> str:  # back from an entry number to its place in the array
        name = entries[i].name if i < len(entries) else alias_names[i - len(entries)]
        field_name = {"dims": "shape", "dtypes": "dtype", "alias_targets": "alias"}.get(field_name, field_name)
        return f"{path}.tensors[{position.get(name, i)}].{field_name}"

    return validate(columns_from_entries(entries, aliases, order, where), data_length, region)


def _parse_section(raw: Any, path: str, region_of: str | None) -> SectionEntry:
    f = _Fields(raw, path, region_of or "header")
    name = f.get("name", str)
    if not name or len(name.encode()) > MAX_NAME_BYTES:
        raise f.err("name", f"section name must be 1 to {MAX_NAME_BYTES} bytes")
    region = region_of or f"section {name!r}"
    f.region = region
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
    return SectionEntry(
        name=name,
        offset=f.uint("offset"),
        length=f.uint("length"),
        codec=codec.get("name", str),
        configuration=codec.get("configuration", dict, required=False, default={}),
        stream_length=stream_length,
        stream_header_length=header_length,
        stream_header_checksum=stream.checksum("header_checksum"),
        index=_index(f, stream_length - header_length, path, region),
        frames=f.get("frames", bytes, required=False, default=b""),
    )


def _parse_sections(f: _Fields, region_of: str | None) -> tuple[int, str, tuple[SectionEntry, ...]]:
    file_length = f.uint("file_length")
    algorithm = f.get("checksum", str)
    if algorithm not in CHECKSUM_NAMES:
        raise f.err("checksum", f"unknown checksum algorithm {algorithm!r}; known: {', '.join(CHECKSUM_NAMES)}")
    raw_sections = f.get("sections", list)
    if len(raw_sections) > MAX_SECTIONS:
        raise LimitExceededError("section count", len(raw_sections), MAX_SECTIONS, region=f.region)
    sections = tuple(_parse_section(s, f"{f.path}.sections[{i}]", region_of) for i, s in enumerate(raw_sections))
    names = [s.name for s in sections]
    if len(set(names)) != len(names):
        raise f.err("sections", "duplicate section names")
    return file_length, algorithm, sections


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Parsing allocates many small objects and no cycles; letting the cyclic collector run over the
    growing header on every allocation threshold tripled the cost of opening a 3.0 file."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _checked_top(data: bytes | memoryview) -> tuple[_Fields, list[str]]:
    """The decoded header map and its ``must_understand`` list, checked before any other field."""
    f = _Fields(decode_msgpack(data, region="header"), "header", "header")
    must = f.get("must_understand", list, required=False, default=[])
    for i, m in enumerate(must):
        if type(m) is not str:
            raise f.err(f"must_understand[{i}]", f"expected str, found {type(m).__name__}")
    unknown = [m for m in must if m not in KNOWN_EXTENSIONS]
    if unknown:
        raise UnsupportedVersionError(
            f"file requires extensions this reader lacks: {unknown}",
            found=unknown,
            supported=sorted(KNOWN_EXTENSIONS),
            region="header",
        )
    return f, must


def parse_header(data: bytes | memoryview) -> Header:
    """Decode and validate the header bytes (after their checksum was verified).

    ``must_understand`` is checked first, right after decoding, before any other field.

    Raises:
        HeaderError, LimitExceededError, LayoutError, UnsupportedVersionError.
    """
    with _gc_paused():
        f, must = _checked_top(data)
        file_length, algorithm, sections = _parse_sections(f, None)
        trees = f.get("trees", dict, required=False, default={})
        delta = _parse_delta(f, sections, DELTA_EXTENSION in must)
        return Header(file_length=file_length, checksum=algorithm, sections=sections, metadata=f.d.get("metadata"),
                      trees=trees, delta=delta)


def parse_header_metadata(data: bytes | memoryview) -> tuple[int, Any]:
    """(file length, metadata in tagged form) of the header bytes, leaving the sections unread: what
    listing checkpoints by their metadata needs. The msgpack and ``must_understand`` rules hold as in
    :func:`parse_header`; reading tensors always goes through :func:`parse_header`.

    Raises:
        HeaderError, UnsupportedVersionError.
    """
    with _gc_paused():
        f, _ = _checked_top(data)
        return f.uint("file_length"), f.d.get("metadata")


def _parse_delta(f: _Fields, sections: tuple[SectionEntry, ...], required: bool) -> DeltaInfo | None:
    """The ``delta`` map (present exactly when ``must_understand`` lists the extension); every tensor
    it lists is a data entry whose stored dtype is the unsigned integer of its dtype's width."""
    if ("delta" in f.d) != required:
        raise f.err("delta", f"present if and only if must_understand lists {DELTA_EXTENSION!r}")
    if not required:
        return None
    info = parse_delta(f.d["delta"])
    by_section = {s.name: s for s in sections}
    for section, names in info.tensors.items():
        s = by_section.get(section)
        for name, t in names.items():
            dtype = t.dtype
            entry = s.index.get(name) if s is not None else None
            if entry is None:
                raise f.err(f"delta.tensors.{section}.{name}", "names no tensor of the index")
            if entry.dtype != stored_tag(dtype):
                raise f.err(f"delta.tensors.{section}.{name}",
                            f"stored as {entry.dtype}, a {dtype} delta is stored as {stored_tag(dtype)}")
    return info


def parse_index(data: bytes | memoryview) -> Header:
    """Decode the trailer's copy of the section index (a header without metadata or trees)."""
    with _gc_paused():
        f = _Fields(decode_msgpack(data, region="trailer index"), "index", "trailer index")
        file_length, algorithm, sections = _parse_sections(f, "trailer index")
        return Header(file_length=file_length, checksum=algorithm, sections=sections)


def iter_regions(header: Header) -> Iterator[tuple[str, int, int]]:
    """(region, start, end) of every section, in file order."""
    for s in sorted(header.sections, key=lambda s: s.offset):
        yield f"section {s.name!r}", s.offset, s.end
