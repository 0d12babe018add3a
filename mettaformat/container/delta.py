"""Delta checkpoints: a tensor stored as its difference from the same tensor of a base file.

Consecutive checkpoints of one run share most of their high bits: sign, exponent and upper
mantissa barely move between saves, while the low mantissa bytes of trained weights are close to
random in both. The ``zigzag-sub-high`` filter (3.4) stores, per element, the integer difference of
the top ``high`` bytes of the bit patterns (target minus base, modulo 2^(8 high)) mapped by zigzag to
an unsigned integer (0, -1, 1, -2... -> 0, 1, 2, 3...), and the bytes below them as they are. Small
moves in either direction leave those high bytes near zero, and a reader needs only the base's top
``high`` byte planes. The writer picks ``high`` per tensor by measuring. The 3.3 filter
``zigzag-sub`` is the case ``high`` = the element width, and stays readable.

The header names the base (its URI as written, and its identity: the base's header checksum and
file length) and lists, per section, the tensors stored this way with their dtype, the checksum
of the reconstructed bytes and ``high``. Normative description: ``spec/codecs/delta.md``. This
module is the header's part (no torch: the CLI's parsers import it); ``delta_filter.py`` is the
arithmetic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

from mettaformat.constants import MAX_CHAIN_DEPTH
from mettaformat.dtypes import DTYPE_TAGS, itemsize
from mettaformat.errors import HeaderError, MettaFormatError

__all__ = ["DELTA_EXTENSION", "FILTER", "FILTER_WHOLE", "MAX_CHAIN_DEPTH", "BaseRef", "DeltaInfo", "DeltaTensor",
           "base_candidates", "declared_base", "declared_chain", "parse_delta", "stored_tag"]

#: Listed in ``must_understand``: a reader that cannot resolve a base must refuse the file.
DELTA_EXTENSION: Final = "mettaformat.delta"
#: What this writer writes (3.4): the difference of the top bytes only.
FILTER: Final = "zigzag-sub-high"
#: The 3.3 filter: the difference of whole elements (read forever, no longer written).
FILTER_WHOLE: Final = "zigzag-sub"
_STORED: Final = {1: "U8", 2: "U16", 4: "U32", 8: "U64"}


@dataclass(frozen=True)
class BaseRef:
    """The base a delta file was written against: where (as written) and which (its identity)."""

    uri: str
    file_length: int
    header_checksum: int


class DeltaTensor(NamedTuple):
    """One tensor stored as a residual."""

    #: dtype tag of the reconstructed tensor
    dtype: str
    #: checksum of the reconstructed tensor's bytes
    checksum: int
    #: top bytes of each element stored as a difference (the element width for ``zigzag-sub``)
    high: int


@dataclass(frozen=True)
class DeltaInfo:
    base: BaseRef
    #: section -> tensor name -> how it is stored
    tensors: dict[str, dict[str, DeltaTensor]]
    filter: str = FILTER

    def to_msgpack(self) -> dict[str, Any]:
        def entry(t: DeltaTensor) -> list[Any]:
            out: list[Any] = [t.dtype, t.checksum.to_bytes(8, "little")]
            return [*out, t.high] if self.filter == FILTER else out

        return {
            "base": {"uri": self.base.uri, "file_length": self.base.file_length,
                     "header_checksum": self.base.header_checksum.to_bytes(8, "little")},
            "filter": self.filter,
            "tensors": {section: {name: entry(t) for name, t in names.items()}
                        for section, names in self.tensors.items()},
        }


def stored_tag(dtype: str) -> str | None:
    """The unsigned dtype a residual of ``dtype`` is stored as, or None when ``dtype`` takes no delta."""
    if dtype == "BOOL" or dtype not in DTYPE_TAGS:
        return None
    return _STORED.get(itemsize(dtype))


def _err(path: str, message: str) -> HeaderError:
    return HeaderError(message, path=path, region="header")


def _checksum(value: Any, path: str) -> int:
    if type(value) is not bytes or len(value) != 8:
        raise _err(path, "expected an 8-byte checksum")
    return int.from_bytes(value, "little")


def parse_delta(raw: Any) -> DeltaInfo:
    """Validate the header's ``delta`` map (its tensors are checked against the index by the reader)."""
    path = "header.delta"
    if type(raw) is not dict:
        raise _err(path, "expected a map")
    base = raw.get("base")
    if type(base) is not dict:
        raise _err(f"{path}.base", "expected a map")
    uri = base.get("uri")
    if type(uri) is not str or not uri or len(uri.encode()) > 4096 or "\x00" in uri:
        raise _err(f"{path}.base.uri", "expected a non-empty string of at most 4096 bytes without NUL")
    length = base.get("file_length")
    if type(length) is not int or not 0 < length < 1 << 63:
        raise _err(f"{path}.base.file_length", "expected a positive 63-bit integer")
    ref = BaseRef(uri, length, _checksum(base.get("header_checksum"), f"{path}.base.header_checksum"))
    kind = raw.get("filter")
    if kind not in (FILTER, FILTER_WHOLE):
        raise _err(f"{path}.filter", f"unknown delta filter {kind!r}; this reader knows {FILTER!r} and "
                                     f"{FILTER_WHOLE!r}")
    sections = raw.get("tensors")
    if type(sections) is not dict:
        raise _err(f"{path}.tensors", "expected a map")
    tensors: dict[str, dict[str, DeltaTensor]] = {}
    for section, names in sections.items():
        where = f"{path}.tensors.{section}"
        if type(section) is not str or type(names) is not dict:
            raise _err(where, "expected a map of tensor names")
        tensors[section] = {name: _tensor(name, value, kind, f"{where}.{name}") for name, value in names.items()}
    return DeltaInfo(ref, tensors, kind)


def _tensor(name: Any, value: Any, kind: str, where: str) -> DeltaTensor:
    """One entry of the ``tensors`` map: ``[dtype, checksum]`` (``zigzag-sub``) or ``[dtype, checksum, high]``."""
    fields = 3 if kind == FILTER else 2
    if type(name) is not str or type(value) is not list or len(value) != fields or type(value[0]) is not str:
        raise _err(where, "expected [dtype, checksum, high]" if kind == FILTER else "expected [dtype, checksum]")
    if stored_tag(value[0]) is None:
        raise _err(where, f"dtype {value[0]!r} cannot be stored as a delta")
    width = itemsize(value[0])
    high = value[2] if kind == FILTER else width
    if type(high) is not int or not 1 <= high <= width:
        raise _err(f"{where}[2]", f"expected the number of high bytes differenced, 1..{width} for {value[0]}")
    return DeltaTensor(value[0], _checksum(value[1], f"{where}[1]"), high)


def base_candidates(path: Path, uri: str) -> list[Path]:
    """Where the base of the delta file ``path`` is looked for, in order."""
    written = Path(uri)
    first = written if written.is_absolute() else path.parent / written
    beside = path.parent / written.name
    return [first] if beside == first else [first, beside]


def declared_base(path: str | os.PathLike[str]) -> Path | None:
    """Where the base of the container ``path`` lies (the first candidate that exists, else the first),
    from its header alone; None for a standalone file or one whose header cannot be read. For tools
    that must not follow the chain (retention keeps bases a kept file needs, even damaged ones)."""
    from mettaformat.constants import PREAMBLE_SIZE
    from mettaformat.container.header import parse_header
    from mettaformat.container.layout import Preamble, checksum

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            preamble = Preamble.unpack(f.read(PREAMBLE_SIZE), size)
            header_bytes = f.read(preamble.header_length)
        if checksum(header_bytes) != preamble.header_checksum:
            return None
        delta = parse_header(header_bytes).delta
    except (OSError, MettaFormatError):
        return None
    if delta is None:
        return None
    candidates = base_candidates(Path(path), delta.base.uri)
    return next((p for p in candidates if p.is_file()), candidates[0])


def declared_chain(path: str | os.PathLike[str]) -> list[Path]:
    """The bases of ``path`` as their headers declare them, nearest first (stops at a cycle, a missing
    or unreadable file, or ``MAX_CHAIN_DEPTH``). Headers only, no torch: for ``inspect`` and ``ls``."""
    out: list[Path] = []
    seen = {os.path.realpath(path)}
    base = declared_base(path)
    while base is not None and len(out) < MAX_CHAIN_DEPTH and os.path.realpath(base) not in seen:
        out.append(base)
        seen.add(os.path.realpath(base))
        base = declared_base(base) if base.is_file() else None
    return out
