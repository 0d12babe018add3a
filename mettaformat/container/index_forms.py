"""The two stored forms of a section's tensor index, and :class:`Columns`, the one form the rules read.

3.1 stores packed columns (``spec/FORMAT.md`` §4.4.1); 3.0 stored one map per tensor (§4.4.2). Both
become :class:`Columns` here, with no rule checked beyond what the conversion itself needs (types for
3.0, whole-number widths and UTF-8 for 3.1): the rules are in :mod:`tensor_index`, once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import numpy as np

from mettaformat.dtypes import DTYPE_TABLE_TAGS
from mettaformat.errors import HeaderError

__all__ = ["CODE_TAGS", "Columns", "TensorEntry", "columns_from_entries", "columns_from_map", "entries_msgpack",
           "section_to_entries_form", "to_map"]

#: dtype code -> tag: the row of the spec's dtype table (§6), in table order. Never reordered.
CODE_TAGS: Final = DTYPE_TABLE_TAGS
_CODE_BY_TAG: Final = {tag: code for code, tag in enumerate(CODE_TAGS)}
#: the code a 3.0 entry's tag gets when the table lacks it (the rules then refuse it by name)
UNKNOWN_CODE: Final = 255


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


_WIDTHS: Final = {"u1": 1, "<u4": 4, "<u8": 8}


def _array(data: bytes, dtype: str, path: str, region: str) -> np.ndarray:
    width = _WIDTHS[dtype]
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
        names=names, codes=np.fromiter((_CODE_BY_TAG.get(e.dtype, UNKNOWN_CODE) for e in entries), np.uint8,
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
