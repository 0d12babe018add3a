"""The one dtype table: safetensors tag <-> torch.dtype <-> item size.

The tags are safetensors' own, so the weights section stays a file that
``safetensors.torch.load_file`` reads. Every dtype that ``safetensors.torch`` maps is here;
a tag missing from this table is rejected by name (never guessed).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Final

from mettaformat.errors import HeaderError, WriteError

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPE_TABLE_TAGS", "DTYPE_TAGS", "dtype_from_tag", "itemsize", "tag_from_dtype"]

_TABLE: Final[tuple[tuple[str, str, int], ...]] = (
    # tag, torch attribute, item size in bytes
    ("BOOL", "bool", 1),
    ("U8", "uint8", 1),
    ("I8", "int8", 1),
    ("I16", "int16", 2),
    ("U16", "uint16", 2),
    ("I32", "int32", 4),
    ("U32", "uint32", 4),
    ("I64", "int64", 8),
    ("U64", "uint64", 8),
    ("F16", "float16", 2),
    ("BF16", "bfloat16", 2),
    ("F32", "float32", 4),
    ("F64", "float64", 8),
    ("C64", "complex64", 8),
    ("F8_E4M3", "float8_e4m3fn", 1),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz", 1),
    ("F8_E5M2", "float8_e5m2", 1),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz", 1),
)

_ITEMSIZE: Final[dict[str, int]] = {tag: size for tag, _, size in _TABLE}

#: Every tag this reader understands. The table itself needs no torch, so the header parser
#: (and ``mettaformat inspect``) can check tags without importing it; a tag this torch build
#: lacks is refused when a tensor of it is read.
DTYPE_TAGS: Final = tuple(_ITEMSIZE)
#: Every tag of the spec's table, in table order (its row is the tag's code in a columnar index).
DTYPE_TABLE_TAGS: Final = tuple(tag for tag, _, _ in _TABLE)


@functools.cache
def _torch_tables() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    import torch

    # Older torch builds lack some dtypes (uint16/32/64 before 2.3); those tags then fail to load.
    to_dtype = {
        tag: getattr(torch, attr) for tag, attr, _ in _TABLE if isinstance(getattr(torch, attr, None), torch.dtype)
    }
    return to_dtype, {d: t for t, d in to_dtype.items()}


def dtype_from_tag(tag: str, *, path: str | None = None) -> torch.dtype:
    """The torch dtype for a safetensors tag.

    Raises:
        HeaderError: the tag is unknown (or unsupported by this torch build).
    """
    if not isinstance(tag, str) or tag not in _ITEMSIZE:
        raise HeaderError(f"unknown dtype {tag!r}; this reader knows {', '.join(DTYPE_TAGS)}", path=path)
    dtype = _torch_tables()[0].get(tag)
    if dtype is None:
        raise HeaderError(f"dtype {tag} is not supported by this torch build", path=path)
    return dtype


def tag_from_dtype(dtype: torch.dtype, *, name: str | None = None) -> str:
    """The safetensors tag for a torch dtype.

    Raises:
        WriteError: the dtype cannot be stored in a safetensors stream (complex128, quantized...).
    """
    try:
        return _torch_tables()[1][dtype]
    except KeyError:
        where = f" (tensor {name!r})" if name is not None else ""
        raise WriteError(f"dtype {dtype} cannot be stored in a safetensors stream{where}") from None


def itemsize(tag: str) -> int:
    """Bytes per element of a (known) tag."""
    return _ITEMSIZE[tag]
