"""The rules of a section's tensor index, checked over whole columns: the one place they are written.

Since format 3.1 a section stores its index as packed columns (``spec/FORMAT.md`` §4.4): names,
dtype codes, ranks, dimensions, offsets and checksums, each one msgpack ``bin``. Opening a file
checks every rule over whole columns with numpy, so a tensor costs a few machine words and no
Python object; a :class:`TensorEntry` is built only when that tensor is asked for. The 3.0 layout
(one map per tensor) is converted into the same :class:`Columns` first (:mod:`index_forms`), so the
rules below exist once for both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, Final

import numpy as np

from mettaformat.constants import MAX_NAME_BYTES, MAX_RANK, MAX_TENSOR_BYTES, MAX_TENSORS_PER_SECTION, RESERVED_NAMES
from mettaformat.container.index_forms import (
    CODE_TAGS,
    Columns,
    TensorEntry,
    columns_from_entries,
    columns_from_map,
    entries_msgpack,
    section_to_entries_form,
    to_map,
)
from mettaformat.dtypes import DTYPE_TAGS, itemsize
from mettaformat.errors import HeaderError, LayoutError, LimitExceededError

__all__ = ["Columns", "TensorEntry", "TensorIndex", "columns_from_entries", "columns_from_map", "entries_msgpack",
           "section_to_entries_form", "to_map", "validate"]

#: item size per code; 0 for a tag this torch build lacks (then the tag is unknown here).
_ITEMSIZE_BY_CODE: Final = np.array([itemsize(t) if t in DTYPE_TAGS else 0 for t in CODE_TAGS] + [0] * (256 - len(
    CODE_TAGS)), dtype=np.uint64)
_INT63: Final = 1 << 63
# The ufuncs' own reductions: ndarray.max() and friends add a Python-level call each, which is most
# of their cost on the short columns of a typical index.
_max, _min, _all, _any = np.maximum.reduce, np.minimum.reduce, np.logical_and.reduce, np.logical_or.reduce


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
        bad = next((i for i, n in enumerate(names) if _bad_name(n)), None)
        if bad is not None:
            raise HeaderError(f"invalid tensor name {names[bad]!r} (empty, NUL, reserved or over {MAX_NAME_BYTES} "
                              "bytes)", path=cols.where(bad, "name"), region=region)
    return position


_ONE: Final = np.ones(1, dtype=np.uint64)
#: a float64 product below this is certainly below MAX_TENSOR_BYTES exactly (64 roundings at most)
_SAFE_FLOAT: Final = float(MAX_TENSOR_BYTES) * (1 - 2.0**-40)


def _sizes(cols: Columns, sizes: np.ndarray, region: str) -> tuple[np.ndarray, np.ndarray]:
    """(bytes of each tensor, start of each shape in ``dims``), the product of the non-zero dimensions
    bounded by MAX_TENSOR_BYTES without ever overflowing.

    When the largest dimension and rank cannot reach the limit at all (the usual case) the products are
    taken at once; otherwise a float64 product screens every tensor, and the ones it cannot clear are
    computed exactly with Python integers.
    """
    n = len(cols.names)
    ranks = cols.ranks
    if not n:
        return np.zeros(0, np.uint64), np.zeros(1, np.int64)
    max_rank = int(_max(ranks))
    if max_rank > MAX_RANK:
        raise LimitExceededError("tensor rank", max_rank, MAX_RANK, region=region)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.add.accumulate(ranks, out=starts[1:])
    total = int(starts[-1])
    if total != cols.dims.size:
        raise HeaderError(f"{cols.dims.size} dimensions stored, the ranks need {total}", path=cols.where(0, "dims"),
                          region=region)
    dims = cols.dims
    max_dim = int(_max(dims)) if total else 0
    if max_dim >= _INT63:
        at = int(np.flatnonzero(dims >= _INT63)[0])
        entry = int(np.searchsorted(starts, at, side="right")) - 1
        k = at - int(starts[entry])
        value = cols.source[entry].shape[k] if cols.source is not None else int(dims[at])
        raise HeaderError(f"dimension {value} is not an integer in [0, 2^63)", path=cols.where(entry, f"shape[{k}]"),
                          region=region)
    # reduceat reads an empty segment (rank 0) as its next element: a sentinel 1 ends the array, and
    # scalars are set to their item size afterwards.
    ext = np.concatenate((dims, _ONE))
    head = starts[:-1]
    if max_dim.bit_length() * max_rank + 4 <= MAX_TENSOR_BYTES.bit_length() - 1:
        nbytes = np.multiply.reduceat(ext, head) * sizes  # every product is below the limit
    else:
        nbytes = _bounded_sizes(cols, ext, head, starts, sizes, region)
    if not _all(ranks):
        scalar = ranks == 0
        nbytes[scalar] = sizes[scalar]
    return nbytes, starts


def _bounded_sizes(cols: Columns, ext: np.ndarray, head: np.ndarray, starts: np.ndarray, sizes: np.ndarray,
                   region: str) -> np.ndarray:
    nonzero_dims = np.maximum(ext, 1)
    estimate = np.multiply.reduceat(nonzero_dims.astype(np.float64), head) * sizes
    nonzero = np.multiply.reduceat(nonzero_dims, head) * sizes
    unsure = (estimate >= _SAFE_FLOAT) & (cols.ranks > 0)
    for i in np.flatnonzero(unsure).tolist():
        exact = int(sizes[i])
        for d in cols.dims[starts[i]:starts[i + 1]].tolist():
            exact *= d or 1
        if exact > MAX_TENSOR_BYTES:
            raise HeaderError(f"tensor size overflows the {MAX_TENSOR_BYTES}-byte limit", path=cols.where(i, "shape"),
                              region=region)
        nonzero[i] = exact
    empty = np.minimum.reduceat(ext, head) == 0
    out: np.ndarray = np.where(empty & (cols.ranks > 0), np.uint64(0), nonzero)
    return out


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
    if n and not _min(sizes):
        _fail(cols, sizes == 0, "dtype", lambda i: f"unknown dtype {_tag_text(cols, i)}; this reader knows "
              f"{', '.join(DTYPE_TAGS)}", region)
    nbytes, starts = _sizes(cols, sizes, region)
    begins, ends = cols.offsets[0::2], cols.offsets[1::2]
    # end - begin wraps around for end < begin, to a value no tensor size can equal
    if n and (int(_max(cols.offsets)) >= _INT63 or _any((ends - begins != nbytes) | (begins % sizes != 0))):
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
    if n and (begins[0] != 0 or not _all(begins[1:] == ends[:-1])):
        data_order = np.lexsort((ends, begins))
        _check_coverage(cols, begins[data_order], ends[data_order], data_order, region)
    else:
        data_order = None
    covered = int(ends[-1]) if n and data_order is None else int(ends.max(initial=0))
    if covered != data_length:
        raise LayoutError(f"tensors cover {covered} bytes of a {data_length}-byte data region", region=region)
    return TensorIndex(cols, position, starts, data_order)


def _tag_text(cols: Columns, i: int) -> str:
    return repr(cols.source[i].dtype) if cols.source is not None else f"code {int(cols.codes[i])}"


def _check_coverage(cols: Columns, begins: np.ndarray, ends: np.ndarray, order: np.ndarray, region: str) -> None:
    """Tensors sorted by offsets tile from 0 with no overlap (tied data is an alias) and no hole."""
    expected = np.concatenate((np.zeros(1, np.uint64), ends[:-1]))
    wrong = np.flatnonzero(begins != expected)
    if wrong.size:
        k = int(wrong[0])
        i, at = int(order[k]), int(expected[k])
        kind = "overlaps the previous tensor" if begins[k] < at else f"leaves a hole after offset {at}"
        raise LayoutError(f"tensor {cols.names[i]!r} at [{begins[k]}, {ends[k]}] {kind}", region=region)


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
        """Every data entry, in data order: built from whole columns at once (one conversion per column
        instead of several per entry)."""
        c = self.columns
        n = len(c.names)
        dims, starts, ranks = c.dims.tolist(), self._starts.tolist(), c.ranks.tolist()
        offsets = c.offsets.tolist()
        sums = np.frombuffer(c.checksums, dtype="<u8").tolist() if n else []
        tags = [CODE_TAGS[code] for code in c.codes.tolist()]
        numbers = range(n) if self._data_order is None else self._data_order.tolist()
        return tuple(TensorEntry(c.names[i], tags[i], tuple(dims[starts[i]:starts[i] + ranks[i]]), offsets[2 * i],
                                 offsets[2 * i + 1], sums[i]) for i in numbers)

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
