"""The tensor index of a section, held as columns and validated in bulk: the one place of its rules.

Since format 3.1 a section stores its index as packed columns (``spec/FORMAT.md`` §4.4): names,
dtype codes, ranks, dimensions, offsets and checksums, each one msgpack ``bin``. Opening a file
checks every rule over whole columns with numpy, so a tensor costs a few machine words and no
Python object; a :class:`TensorEntry` is built only when that tensor is asked for. The 3.0 layout
(one map per tensor) is converted into the same columns first (``columns_from_entries``), so the
rules below exist once for both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import numpy as np

from mettaformat.constants import MAX_NAME_BYTES, MAX_RANK, MAX_TENSOR_BYTES, MAX_TENSORS_PER_SECTION, RESERVED_NAMES
from mettaformat.dtypes import DTYPE_TABLE_TAGS, DTYPE_TAGS, itemsize
from mettaformat.errors import HeaderError, LayoutError, LimitExceededError

__all__ = ["Columns", "TensorEntry", "TensorIndex", "columns_from_entries", "columns_from_map", "entries_msgpack",
           "section_to_entries_form", "to_map", "validate"]

#: dtype code -> tag: the row of the spec's dtype table (§6), in table order. Never reordered.
CODE_TAGS: Final = DTYPE_TABLE_TAGS
_CODE_BY_TAG: Final = {tag: code for code, tag in enumerate(CODE_TAGS)}
#: item size per code; 0 for a tag this torch build lacks (then the tag is unknown here).
_ITEMSIZE_BY_CODE: Final = np.array([itemsize(t) if t in DTYPE_TAGS else 0 for t in CODE_TAGS] + [0] * (256 - len(
    CODE_TAGS)), dtype=np.uint64)
_UNKNOWN_CODE: Final = 255
_INT63: Final = 1 << 63


class TensorEntry(NamedTuple):
    """One tensor of a section. ``begin``/``end`` are offsets inside the stream's data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    checksum: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Columns:
    """An index as columns, before validation. Data entries ``0..n-1``; aliases number on from ``n``."""

    names: list[str]
    codes: np.ndarray  # uint8, one per data entry
    ranks: np.ndarray  # uint8
    dims: np.ndarray  # uint64, every shape concatenated
    offsets: np.ndarray  # uint64, begin and end per data entry
    checksums: bytes  # 8 bytes per data entry, little-endian xxh3-64
    alias_names: list[str]
    alias_targets: np.ndarray  # uint32, the data entry of each alias
    order: np.ndarray | None  # uint32 permutation of all entries: the saved order; None = as numbered
    #: where an entry's field lives, for error messages: (entry number, field) -> dotted path
    where: Callable[[int, str], str]
    #: the entries as written, where the layout spells them out (3.0): messages quote their values
    source: Sequence[TensorEntry] | None = None
    source_aliases: dict[str, str] | None = None


def _fail(cols: Columns, bad: np.ndarray, field: str, message: Callable[[int], str], region: str) -> None:
    if bad.any():  # the index of the first offender only when there is one
        i = int(np.flatnonzero(bad)[0])
        raise HeaderError(message(i), path=cols.where(i, field), region=region)


def _bad_name(name: str) -> bool:
    return (not name or "\x00" in name or name in RESERVED_NAMES
            or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES)


def _check_names(cols: Columns, region: str) -> dict[str, int]:
    names = [*cols.names, *cols.alias_names]
    position = dict(zip(names, range(len(names)), strict=False))
    if len(position) != len(names):
        seen: set[str] = set()
        i = next(i for i, n in enumerate(names) if n in seen or seen.add(n))  # type: ignore[func-returns-value]
        raise HeaderError(f"duplicate tensor name {names[i]!r}", path=cols.where(i, "name"), region=region)
    # Whole-list screens in C; only a list that fails one is walked name by name for the culprit.
    if names and (min(map(len, names)) == 0 or max(map(len, names)) * 4 > MAX_NAME_BYTES
                  or "\x00" in "".join(names) or not RESERVED_NAMES.isdisjoint(position)):
        i = next((i for i, n in enumerate(names) if _bad_name(n)), None)
        if i is not None:
            raise HeaderError(f"invalid tensor name {names[i]!r} (empty, NUL, reserved or over {MAX_NAME_BYTES} "
                              "bytes)", path=cols.where(i, "name"), region=region)
    return position


_ONE: Final = np.ones(1, dtype=np.uint64)
#: a float64 product below this is certainly below MAX_TENSOR_BYTES exactly (64 roundings at most)
_SAFE_FLOAT: Final = float(MAX_TENSOR_BYTES) * (1 - 2.0**-40)


def _sizes(cols: Columns, sizes: np.ndarray, region: str) -> tuple[np.ndarray, np.ndarray]:
    """(bytes of each tensor, start of each shape in ``dims``), the product of the non-zero dimensions
    bounded by MAX_TENSOR_BYTES without ever overflowing: a float64 product screens every tensor at
    once; integer products are taken only where the screen says they fit, and exactly (Python ints)
    where it cannot tell."""
    n = len(cols.names)
    ranks = cols.ranks
    if not n:
        return np.zeros(0, np.uint64), np.zeros(1, np.int64)
    if int(ranks.max()) > MAX_RANK:
        raise LimitExceededError("tensor rank", int(ranks.max()), MAX_RANK, region=region)
    total = int(ranks.sum(dtype=np.int64))
    if total != cols.dims.size:
        raise HeaderError(f"{cols.dims.size} dimensions stored, the ranks need {total}", path=cols.where(0, "dims"),
                          region=region)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(ranks, out=starts[1:])
    dims = cols.dims
    if total and int(dims.max()) >= _INT63:
        at = int(np.flatnonzero(dims >= _INT63)[0])
        entry = int(np.searchsorted(starts, at, side="right")) - 1
        k = at - int(starts[entry])
        value = cols.source[entry].shape[k] if cols.source is not None else int(dims[at])
        raise HeaderError(f"dimension {value} is not an integer in [0, 2^63)", path=cols.where(entry, f"shape[{k}]"),
                          region=region)
    # reduceat reads an empty segment (rank 0) as its next element: a sentinel 1 ends the array, and
    # scalars are set to 1 afterwards.
    ext = np.concatenate((dims, _ONE))
    head = starts[:-1]
    nonzero_dims = np.maximum(ext, 1)
    scalar = ranks == 0
    estimate = np.multiply.reduceat(nonzero_dims.astype(np.float64), head) * sizes
    nonzero = np.multiply.reduceat(nonzero_dims, head) * sizes
    if scalar.any():
        estimate[scalar] = sizes[scalar]
        nonzero[scalar] = sizes[scalar]
    unsure = estimate >= _SAFE_FLOAT
    if unsure.any():
        for i in np.flatnonzero(unsure).tolist():
            exact = int(sizes[i])
            for d in dims[starts[i]:starts[i + 1]].tolist():
                exact *= d or 1
            if exact > MAX_TENSOR_BYTES:
                raise HeaderError(f"tensor size overflows the {MAX_TENSOR_BYTES}-byte limit",
                                  path=cols.where(i, "shape"), region=region)
            nonzero[i] = exact
    empty = (np.minimum.reduceat(ext, head) == 0) & ~scalar
    return np.where(empty, np.uint64(0), nonzero), starts


def validate(cols: Columns, data_length: int, region: str) -> TensorIndex:
    """Check every rule of §4.4 and the coverage rule of §5.3 over whole columns.

    Raises:
        HeaderError, LimitExceededError, LayoutError: naming the first entry at fault.
    """
    n = len(cols.names)
    if n + len(cols.alias_names) > MAX_TENSORS_PER_SECTION:
        raise LimitExceededError("tensor count", n + len(cols.alias_names), MAX_TENSORS_PER_SECTION, region=region)
    widths = {"dtypes": cols.codes.size, "ranks": cols.ranks.size, "offsets": cols.offsets.size / 2,
              "checksums": len(cols.checksums) / 8, "alias_targets": cols.alias_targets.size}
    for column, width in widths.items():
        if width != (len(cols.alias_names) if column == "alias_targets" else n):
            raise HeaderError(f"holds {width} entries for {n} tensors and {len(cols.alias_names)} aliases",
                              path=cols.where(0, column), region=region)
    position = _check_names(cols, region)
    sizes = _ITEMSIZE_BY_CODE[cols.codes]
    _fail(cols, sizes == 0, "dtype", lambda i: f"unknown dtype {_tag_text(cols, i)}; this reader knows "
          f"{', '.join(DTYPE_TAGS)}", region)
    nbytes, starts = _sizes(cols, sizes, region)
    begins, ends = cols.offsets[0::2], cols.offsets[1::2]
    if n and ((begins >= _INT63) | (ends >= _INT63) | (ends - begins != nbytes) | (begins % sizes != 0)).any():
        _fail(cols, (begins >= _INT63) | (ends >= _INT63), "offsets",
              lambda i: "expected [begin, end] non-negative integers below 2^63", region)
        _fail(cols, (ends < begins) | (ends - begins != nbytes), "offsets",
              lambda i: f"[{begins[i]}, {ends[i]}] holds {int(ends[i]) - int(begins[i])} bytes, shape and dtype "
              f"need {nbytes[i]}", region)
        _fail(cols, begins % sizes != 0, "offsets",
              lambda i: f"begin {begins[i]} is not aligned to the {sizes[i]}-byte element size", region)
    if cols.alias_targets.size and int(cols.alias_targets.max()) >= n:
        i = int(np.flatnonzero(cols.alias_targets >= n)[0])
        alias = cols.alias_names[i]
        target = cols.source_aliases[alias] if cols.source_aliases is not None else int(cols.alias_targets[i])
        raise HeaderError(f"alias {alias!r} points to {target!r}, which is not a stored tensor",
                          path=cols.where(n + i, "alias"), region=region)
    total = n + len(cols.alias_names)
    if cols.order is not None and (cols.order.size != total or not np.array_equal(
            np.sort(cols.order), np.arange(total, dtype=cols.order.dtype))):
        raise HeaderError("order is not a permutation of the entries", path=cols.where(0, "order"), region=region)
    # The writer stores data in offset order; only other files need the sort.
    in_order = n == 0 or bool((begins[1:] == ends[:-1]).all())
    data_order = None if in_order else np.lexsort((ends, begins))
    if in_order:
        _check_coverage(cols, begins, ends, None, data_length, region)
    else:
        _check_coverage(cols, begins[data_order], ends[data_order], data_order, data_length, region)
    return TensorIndex(cols, position, starts, data_order)


def _tag_text(cols: Columns, i: int) -> str:
    return repr(cols.source[i].dtype) if cols.source is not None else f"code {int(cols.codes[i])}"


def _check_coverage(cols: Columns, begins: np.ndarray, ends: np.ndarray, order: np.ndarray | None,
                    data_length: int, region: str) -> None:
    """Tensors (sorted by offsets) tile the data region exactly: no overlap (tied data is an alias), no holes."""
    if begins.size and (begins[0] != 0 or not (begins[1:] == ends[:-1]).all()):
        expected = np.concatenate((np.zeros(1, np.uint64), ends[:-1]))
        k = int(np.flatnonzero(begins != expected)[0])
        i, at = (k if order is None else int(order[k])), int(expected[k])
        kind = "overlaps the previous tensor" if begins[k] < at else f"leaves a hole after offset {at}"
        raise LayoutError(f"tensor {cols.names[i]!r} at [{begins[k]}, {ends[k]}] {kind}", region=region)
    covered = int(ends[-1]) if ends.size else 0
    if covered != data_length:
        raise LayoutError(f"tensors cover {covered} bytes of a {data_length}-byte data region", region=region)


class TensorIndex:
    """A validated index. Entries are built on access; ``tensors`` builds them all (data order)."""

    def __init__(self, cols: Columns, position: dict[str, int], starts: np.ndarray,
                 data_order: np.ndarray | None) -> None:
        self.columns = cols
        self._position = position
        self._starts = starts
        self._data_order = data_order

    def __len__(self) -> int:
        return len(self._position)

    def entry(self, i: int) -> TensorEntry:
        c = self.columns
        start, rank = int(self._starts[i]), int(c.ranks[i])
        return TensorEntry(c.names[i], CODE_TAGS[c.codes[i]], tuple(c.dims[start:start + rank].tolist()),
                           int(c.offsets[2 * i]), int(c.offsets[2 * i + 1]),
                           int.from_bytes(c.checksums[8 * i:8 * i + 8], "little"))

    def get(self, name: str) -> TensorEntry | None:
        """The data entry of ``name``, following an alias to its target."""
        i = self._position.get(name)
        if i is None:
            return None
        n = len(self.columns.names)
        return self.entry(i if i < n else int(self.columns.alias_targets[i - n]))

    @functools.cached_property
    def tensors(self) -> tuple[TensorEntry, ...]:
        numbers = range(len(self.columns.names)) if self._data_order is None else self._data_order.tolist()
        return tuple(map(self.entry, numbers))

    @functools.cached_property
    def aliases(self) -> dict[str, str]:
        c = self.columns
        return {a: c.names[t] for a, t in zip(c.alias_names, c.alias_targets.tolist(), strict=True)}

    @functools.cached_property
    def order(self) -> tuple[str, ...]:
        names = [*self.columns.names, *self.columns.alias_names]
        if self.columns.order is None:
            return tuple(names)
        return tuple(map(names.__getitem__, self.columns.order.tolist()))

    def key(self) -> tuple[Any, ...]:
        """Everything the index says, name by name in saved order, whatever the form or the numbering of
        its entries: what the trailer's copy must repeat (§4.6)."""
        c = self.columns
        n = len(c.names)
        rows: list[tuple[Any, ...]] = []
        for name in self.order:
            i = self._position[name]
            rows.append(tuple(self.entry(i)) if i < n else (name, c.names[c.alias_targets[i - n]]))
        return tuple(rows)

    def __iter__(self) -> Iterator[TensorEntry]:
        return iter(self.tensors)


# -- building columns ----------------------------------------------------------------------------
def _join_names(names: Sequence[str]) -> bytes:
    return "".join(n + "\x00" for n in names).encode("utf-8")


def _split_names(data: bytes, path: str, region: str) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(f"names are not UTF-8: {e}", path=path, region=region) from None
    if text and not text.endswith("\x00"):
        raise HeaderError("the last name is not terminated by NUL", path=path, region=region)
    return text.split("\x00")[:-1]


def _array(data: bytes, dtype: str, path: str, region: str) -> np.ndarray:
    width = np.dtype(dtype).itemsize
    if len(data) % width:
        raise HeaderError(f"{len(data)} bytes is not a whole number of {width}-byte values", path=path, region=region)
    return np.frombuffer(data, dtype=dtype)


def columns_from_map(get: Callable[[str, bool], bytes | None], path: str, region: str) -> Columns:
    """Columns of a 3.1 ``index`` map; ``get(key, required)`` returns a checked ``bin`` value."""
    names = _split_names(get("names", True) or b"", f"{path}.names", region)
    alias_names = _split_names(get("aliases", False) or b"", f"{path}.aliases", region)
    order = get("order", False)
    n = len(names)
    fields = {"name": "names", "dtype": "dtypes", "shape": "dims", "offsets": "offsets", "alias": "alias_targets"}

    def where(i: int, field: str) -> str:
        field = field.split("[")[0]  # a dimension's place is told by the message
        column = fields.get(field, field)
        if field in ("name", "alias") and i >= n:
            return f"{path}.{'aliases' if field == 'name' else 'alias_targets'}[{i - n}]"
        return f"{path}.{column}[{i}]" if field in fields else f"{path}.{column}"

    return Columns(
        names=names, codes=_array(get("dtypes", True) or b"", "u1", f"{path}.dtypes", region),
        ranks=_array(get("ranks", True) or b"", "u1", f"{path}.ranks", region),
        dims=_array(get("dims", True) or b"", "<u8", f"{path}.dims", region),
        offsets=_array(get("offsets", True) or b"", "<u8", f"{path}.offsets", region),
        checksums=get("checksums", True) or b"", alias_names=alias_names,
        alias_targets=_array(get("alias_targets", False) or b"", "<u4", f"{path}.alias_targets", region),
        order=None if order is None else _array(order, "<u4", f"{path}.order", region), where=where,
    )


def to_map(cols: Columns) -> dict[str, bytes]:
    """The 3.1 ``index`` map of ``cols`` (the writer's encoding, fixed width in every field)."""
    out = {"names": _join_names(cols.names), "dtypes": cols.codes.astype("u1").tobytes(),
           "ranks": cols.ranks.astype("u1").tobytes(), "dims": cols.dims.astype("<u8").tobytes(),
           "offsets": cols.offsets.astype("<u8").tobytes(), "checksums": cols.checksums}
    if cols.alias_names:
        out["aliases"] = _join_names(cols.alias_names)
        out["alias_targets"] = cols.alias_targets.astype("<u4").tobytes()
    if cols.order is not None:
        out["order"] = cols.order.astype("<u4").tobytes()
    return out


def entries_msgpack(cols: Columns) -> list[dict[str, Any]]:
    """The 3.0 form of an index (one map per tensor, in saved order), for tools that edit or show it."""
    starts = np.concatenate(([0], np.cumsum(cols.ranks, dtype=np.int64)))
    entries: list[dict[str, Any]] = [
        {"name": name, "dtype": CODE_TAGS[code] if code < len(CODE_TAGS) else f"code {code}",
         "shape": cols.dims[starts[i]:starts[i + 1]].tolist(), "offsets": cols.offsets[2 * i:2 * i + 2].tolist(),
         "checksum": cols.checksums[8 * i:8 * i + 8]}
        for i, (name, code) in enumerate(zip(cols.names, cols.codes.tolist(), strict=True))
    ]
    entries += [{"name": a, "alias": cols.names[t]} for a, t in zip(cols.alias_names, cols.alias_targets.tolist(),
                                                                     strict=True)]
    if cols.order is None:
        return entries
    return [entries[k] for k in cols.order.tolist()]


def section_to_entries_form(section: dict[str, Any]) -> None:
    """Rewrite a decoded section map's columnar ``index`` as a 3.0 ``tensors`` array, in place (for
    tools that edit a header one field at a time; the key order stays the writer's)."""
    if "index" not in section:
        return
    columns = section.pop("index")
    frames = section.pop("frames", None)
    section["tensors"] = entries_msgpack(columns_from_map(lambda key, _required: columns.get(key), "index", "index"))
    if frames is not None:
        section["frames"] = frames


def columns_from_entries(entries: Sequence[TensorEntry], aliases: dict[str, str], order: Sequence[str],
                         where: Callable[[int, str], str] | None = None) -> Columns:
    """Columns of known-good entries (the writer's plan, or a 3.0 index already type-checked)."""
    names = [e.name for e in entries]
    number = {name: i for i, name in enumerate(names)}
    alias_names = list(aliases)
    number.update({a: len(names) + k for k, a in enumerate(alias_names)})
    permutation = np.fromiter((number[n] for n in order), dtype="<u4", count=len(order))
    natural = np.array_equal(permutation, np.arange(len(permutation), dtype="<u4"))
    return Columns(
        names=names, codes=np.fromiter((_CODE_BY_TAG.get(e.dtype, _UNKNOWN_CODE) for e in entries), np.uint8,
                                       len(entries)),
        ranks=np.fromiter((len(e.shape) for e in entries), np.int64, len(entries)),
        dims=np.fromiter((_u64(d) for e in entries for d in e.shape), np.uint64),
        offsets=np.fromiter((_u64(x) for e in entries for x in (e.begin, e.end)), np.uint64, 2 * len(entries)),
        checksums=b"".join(e.checksum.to_bytes(8, "little") for e in entries), alias_names=alias_names,
        alias_targets=np.fromiter((number.get(aliases[a], 0xFFFFFFFF) for a in alias_names), "<u4",
                                  len(alias_names)),
        order=None if natural else permutation, where=where or (lambda i, field: f"tensors[{i}].{field}"),
        source=entries, source_aliases=aliases,
    )


def _u64(x: int) -> int:
    """Values outside u64 become the largest u64, which every range rule then refuses."""
    return x if 0 <= x < 1 << 64 else (1 << 64) - 1
