"""numpy arrays, dtypes and scalars from pickles, decoded as data without importing numpy.

numpy pickles an array as ``_reconstruct(ndarray, (0,), b'b')`` followed by ``BUILD`` with
``(version, shape, dtype, is_fortran, raw_bytes)``; a dtype as ``dtype('f4', False, True)``
plus ``BUILD (3, '<', ...)``; a scalar as ``scalar(dtype, raw_bytes)``. numpy 1.x spells the
module ``numpy.core.multiarray``, numpy 2.x ``numpy._core.multiarray`` (both occur in Metta
files). The records are kept as ``LegacyObject("numpy", "ndarray" | "dtype" | "scalar")``
with the pickle's own arguments and state, so they can be re-pickled, and the helpers below
turn them into tensors or Python numbers.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Final, TypeGuard

import torch

from mettaformat.container.tree import LegacyObject
from mettaformat.errors import LegacyFormatError, LegacyUnsupportedError
from mettaformat.legacy.describe import describe
from mettaformat.legacy.tensors import empty_tensor

if TYPE_CHECKING:
    from mettaformat.legacy.unpickler import PickleVM

__all__ = [
    "dtype",
    "is_numpy_array",
    "is_numpy_scalar",
    "ndarray_to_tensor",
    "numpy_scalar_value",
    "reconstruct",
    "scalar",
]

_REGION: Final = "numpy array"
#: numpy kind letter + item size -> torch dtype.
_TORCH_DTYPES: Final[dict[str, torch.dtype]] = {
    "b1": torch.bool,
    "i1": torch.int8,
    "i2": torch.int16,
    "i4": torch.int32,
    "i8": torch.int64,
    "u1": torch.uint8,
    "u2": torch.uint16,
    "u4": torch.uint32,
    "u8": torch.uint64,
    "f2": torch.float16,
    "f4": torch.float32,
    "f8": torch.float64,
    "c8": torch.complex64,
    "c16": torch.complex128,
}
_STRUCT_CODES: Final[dict[str, str]] = {
    "b1": "?",
    "i1": "b",
    "i2": "h",
    "i4": "i",
    "i8": "q",
    "u1": "B",
    "u2": "H",
    "u4": "I",
    "u8": "Q",
    "f2": "e",
    "f4": "f",
    "f8": "d",
}


# -- pickle handlers (called by the VM through the allowlist) -------------------------------------
def reconstruct(vm: PickleVM, args: tuple[Any, ...]) -> LegacyObject:
    """``_reconstruct(ndarray, shape, typecode)``: an empty array record awaiting ``BUILD``."""
    if len(args) != 3 or not isinstance(args[0], LegacyObject) or args[0].class_path != "numpy.ndarray":
        vm.fail("numpy _reconstruct needs (numpy.ndarray, shape, typecode)")
    return LegacyObject("numpy", "ndarray", args=args, kind="reduce")


def dtype(vm: PickleVM, args: tuple[Any, ...]) -> LegacyObject:
    """``numpy.dtype(descr, align, copy)``: a dtype record awaiting ``BUILD``."""
    if not 1 <= len(args) <= 3 or type(args[0]) is not str or len(args[0]) > 64:
        vm.fail("numpy.dtype needs a short type string")
    return LegacyObject("numpy", "dtype", args=args, kind="reduce")


def scalar(vm: PickleVM, args: tuple[Any, ...]) -> LegacyObject:
    """``scalar(dtype, raw)``: a numpy scalar record."""
    if not 1 <= len(args) <= 2 or not _is(args[0], "dtype"):
        vm.fail("numpy scalar needs (numpy.dtype, payload)")
    return LegacyObject("numpy", "scalar", args=args, kind="reduce")


# -- helpers for consumers -----------------------------------------------------------------------
def _is(value: Any, name: str) -> bool:
    return isinstance(value, LegacyObject) and value.module == "numpy" and value.name == name


def is_numpy_array(value: Any) -> bool:
    """True for an array record made by :func:`reconstruct`."""
    return _is(value, "ndarray")


def is_numpy_scalar(value: Any) -> TypeGuard[LegacyObject]:
    """True for a scalar record made by :func:`scalar`."""
    return _is(value, "scalar")


def _dtype_code(record: Any) -> tuple[str, str]:
    """Return ``(kind+size code, byte order)`` of a dtype record, e.g. ``("f4", "<")``."""
    if not _is(record, "dtype"):
        raise LegacyFormatError("numpy value without a dtype record", region=_REGION)
    descr = record.args[0]
    order = "|"
    if isinstance(record.state, tuple) and len(record.state) >= 2 and isinstance(record.state[1], str):
        order = record.state[1]
    if descr in ("?", "bool"):
        descr = "b1"
    if descr not in _TORCH_DTYPES:
        raise LegacyUnsupportedError(f"numpy dtype {descr!r} has no tensor equivalent", region=_REGION)
    return descr, order


def ndarray_to_tensor(record: LegacyObject) -> torch.Tensor:
    """Convert a numpy array record to a CPU tensor (a copy; numpy is never imported).

    Args:
        record: a value for which :func:`is_numpy_array` is true, after ``BUILD``.

    Returns:
        A contiguous tensor of the array's shape and dtype, in native byte order.

    Raises:
        LegacyFormatError: inconsistent shape, dtype or byte count.
        LegacyUnsupportedError: object, string or structured dtypes.
    """
    state = record.state
    if not is_numpy_array(record) or not isinstance(state, tuple) or len(state) != 5:
        raise LegacyFormatError(
            "numpy array record without (version, shape, dtype, fortran, data) state", region=_REGION
        )
    _version, shape, dtype_rec, fortran, raw = state
    code, order = _dtype_code(dtype_rec)
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise LegacyFormatError(f"numpy shape {describe(shape)} is not a tuple of non-negative ints", region=_REGION)
    if not isinstance(raw, (bytes, bytearray)):
        raise LegacyUnsupportedError("numpy array whose payload is not raw bytes (object dtype?)", region=_REGION)
    tdtype = _TORCH_DTYPES[code]
    numel = 1
    for d in shape:
        numel *= d
    if numel * tdtype.itemsize != len(raw):
        raise LegacyFormatError(
            f"numpy array of shape {shape} {code} needs {numel * tdtype.itemsize} bytes, has {len(raw)}", region=_REGION
        )
    if numel == 0:
        return empty_tensor(shape, tdtype, region=_REGION)
    flat = torch.frombuffer(bytearray(raw), dtype=tdtype)
    if order == ">" and tdtype.itemsize > 1:
        unit = tdtype.itemsize // 2 if tdtype.is_complex else tdtype.itemsize
        flat = flat.view(torch.uint8).view(-1, unit).flip(1).contiguous().view(-1).view(tdtype)
    if fortran:
        return flat.view(tuple(reversed(shape))).permute(*reversed(range(len(shape)))).contiguous()
    return flat.view(shape)


def numpy_scalar_value(record: LegacyObject) -> bool | int | float | complex:
    """Convert a numpy scalar record to the equivalent Python number.

    Raises:
        LegacyFormatError: a payload whose length does not match the dtype.
        LegacyUnsupportedError: dtypes without a Python number equivalent.
    """
    if not is_numpy_scalar(record) or len(record.args) != 2 or not isinstance(record.args[1], (bytes, bytearray)):
        raise LegacyFormatError("numpy scalar record without raw bytes", region=_REGION)
    code, order = _dtype_code(record.args[0])
    raw = bytes(record.args[1])
    endian = ">" if order == ">" else "<"
    if code in ("c8", "c16"):
        part = "f" if code == "c8" else "d"
        if len(raw) != struct.calcsize(endian + part * 2):
            raise LegacyFormatError("numpy complex scalar of the wrong size", region=_REGION)
        re, im = struct.unpack(endian + part * 2, raw)
        return complex(re, im)
    fmt = endian + _STRUCT_CODES[code]
    if len(raw) != struct.calcsize(fmt):
        raise LegacyFormatError(f"numpy {code} scalar of {len(raw)} bytes", region=_REGION)
    value: bool | int | float = struct.unpack(fmt, raw)[0]
    return value
