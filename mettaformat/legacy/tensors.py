"""Storages and tensor views rebuilt from legacy pickles, with every bound checked first.

torch's rebuild functions call ``Tensor.set_`` on whatever the pickle names; here a view is
created only after its extent has been proven to lie inside a storage whose byte length was
itself checked against the archive record (threat model PK21-PK23). Tensors that share a storage
come back as views of one storage tensor, exactly like ``torch.load``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import torch

from mettaformat.errors import LegacyFormatError, LegacyLimitError, LegacyUnsupportedError
from mettaformat.legacy.describe import describe

if TYPE_CHECKING:
    from mettaformat.legacy.unpickler import PickleVM

__all__ = [
    "REBUILDS",
    "STORAGE_CLASS_DTYPES",
    "UNTYPED_STORAGE_CLASSES",
    "StorageRef",
    "StorageType",
    "check_arity",
    "check_storage_type",
    "empty_tensor",
    "rebuild_view",
    "tensor_from_buffer",
]

#: Legacy typed storage classes (``torch.<Name>``) and their element dtypes. Quantized storages
#: are deliberately absent: they only occur with ``_rebuild_qtensor``, which is unsupported.
STORAGE_CLASS_DTYPES: Final[dict[str, torch.dtype]] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
}
#: Class paths torch writes for untyped (byte) storages; dtypes then come from
#: ``_rebuild_tensor_v3``. The underscored names are from torch 1.11-1.12.
UNTYPED_STORAGE_CLASSES: Final = frozenset(
    {
        ("torch", "UntypedStorage"),
        ("torch.storage", "UntypedStorage"),
        ("torch", "_UntypedStorage"),
        ("torch.storage", "_UntypedStorage"),
    }
)
_MAX_DIM: Final = 1 << 62
_QUANTIZED_DTYPES: Final = frozenset({torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4})
_QUANTIZED_STORAGES: Final = frozenset(
    {"QInt8Storage", "QUInt8Storage", "QInt32Storage", "QUInt4x2Storage", "QUInt2x4Storage"}
)


@dataclass(frozen=True)
class StorageType:
    """An allowlisted storage class named in a pickle (the second field of a storage id).

    Attributes:
        class_path: ``module.name`` as the pickle spelled it.
        dtype: element dtype; ``torch.uint8`` for untyped storages.
        untyped: True for ``UntypedStorage`` (sizes are in bytes).
    """

    class_path: str
    dtype: torch.dtype
    untyped: bool = False


@dataclass(frozen=True, eq=False)
class StorageRef:
    """One storage of a legacy file: a 1-D CPU tensor over its elements.

    Attributes:
        key: the storage key (``data/<key>`` in a zip, the root key in a legacy stream).
        dtype: element dtype of ``tensor``.
        tensor: 1-D contiguous CPU tensor holding the storage's elements.
        untyped: True when the pickle named an untyped storage class.
    """

    key: str
    dtype: torch.dtype
    tensor: torch.Tensor
    untyped: bool = False

    @property
    def numel(self) -> int:
        return int(self.tensor.numel())


def check_storage_type(value: object, *, region: str, offset: int | None) -> StorageType:
    """Return ``value`` if it is an allowlisted storage class, else raise.

    Raises:
        LegacyUnsupportedError: quantized storages (PK25) or any other class (PK24).
    """
    if isinstance(value, StorageType):
        return value
    name = getattr(value, "name", "")
    if getattr(value, "module", "") == "torch" and name in _QUANTIZED_STORAGES:
        raise LegacyUnsupportedError(
            f"unsupported tensor kind: quantized storage torch.{name}", region=region, offset=offset
        )
    raise LegacyUnsupportedError(f"unknown storage class {describe(value)}", region=region, offset=offset)


def tensor_from_buffer(
    buf: bytearray | memoryview, offset: int, numel: int, dtype: torch.dtype, *, swap: bool, region: str
) -> torch.Tensor:
    """Make a 1-D tensor over ``numel`` elements of ``buf`` starting at byte ``offset``.

    The tensor shares memory with ``buf`` when the bytes are writable and aligned for
    ``dtype`` (the common case for torch zips, whose records are 64-byte aligned); otherwise
    the bytes are copied.

    Args:
        buf: the whole input buffer.
        offset: start of the storage's bytes in ``buf``.
        numel: element count; the caller has checked ``numel * itemsize`` bytes exist.
        dtype: element dtype.
        swap: byteswap each element (files written on big-endian hosts, threat model PK26).
        region: region named in errors.

    Returns:
        A 1-D contiguous CPU tensor.

    Raises:
        LegacyFormatError: if the bytes do not exist in ``buf``.
    """
    itemsize = dtype.itemsize
    nbytes = numel * itemsize
    if offset < 0 or offset + nbytes > len(buf):
        raise LegacyFormatError(f"storage of {nbytes} bytes runs past the end of the input", region=region)
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    writable = isinstance(buf, bytearray) or (isinstance(buf, memoryview) and not buf.readonly)
    if writable and offset % itemsize == 0:
        t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=offset)
    else:
        t = torch.frombuffer(bytearray(memoryview(buf)[offset : offset + nbytes]), dtype=dtype)
    if swap and itemsize > 1:
        # Complex numbers are two floats, each stored in the writer's byte order.
        unit = itemsize // 2 if dtype.is_complex else itemsize
        t = t.view(torch.uint8).view(-1, unit).flip(1).contiguous().view(-1).view(dtype)
    return t


def empty_tensor(shape: tuple[int, ...], dtype: torch.dtype, *, region: str) -> torch.Tensor:
    """A tensor of no elements; its contiguous strides must fit in int64, as torch requires."""
    stride = 1
    for d in shape:
        stride *= max(d, 1)
    if stride >= 1 << 63:
        raise LegacyFormatError(f"empty tensor of shape {describe(shape)} has dimensions too large", region=region)
    return torch.empty(shape, dtype=dtype)


def _int_tuple(value: object, what: str, region: str) -> tuple[int, ...]:
    # bool is an int subclass; a pickle that writes True as a size is malformed (threat model PK7).
    if not isinstance(value, tuple):
        raise LegacyFormatError(f"tensor {what} must be a tuple of ints, got {type(value).__name__}", region=region)
    for x in value:
        if type(x) is not int:
            raise LegacyFormatError(f"tensor {what} must be a tuple of ints, got {type(value).__name__}", region=region)
    for x in value:
        if x < 0 or x >= _MAX_DIM:
            raise LegacyFormatError(f"tensor {what} {describe(value)} has a negative or oversized entry", region=region)
    return value


def rebuild_view(
    storage: StorageRef,
    storage_offset: object,
    size: object,
    stride: object,
    *,
    dtype: torch.dtype | None,
    max_expanded_bytes: int,
    region: str,
) -> torch.Tensor:
    """Interpret ``_rebuild_tensor_v2/_v3`` arguments as a bounds-checked view of ``storage``.

    Args:
        storage: the storage the tensor lives in.
        storage_offset: element offset of the first element (non-negative int).
        size: shape, a tuple of non-negative ints.
        stride: strides in elements, a tuple of non-negative ints of the same length.
        dtype: for ``_rebuild_tensor_v3``, the tensor dtype over an untyped storage.
        max_expanded_bytes: cap on the logical size of views larger than their storage.
        region: region named in errors.

    Returns:
        A view of ``storage.tensor`` (shared with every other view of that storage).

    Raises:
        LegacyFormatError: malformed arguments or a view outside the storage (PK7, PK22).
        LegacyLimitError: an expanded view whose logical size exceeds the cap.
        LegacyUnsupportedError: a dtype that does not match the storage.
    """
    if type(storage_offset) is not int or storage_offset < 0 or storage_offset >= _MAX_DIM:
        raise LegacyFormatError(
            f"tensor storage offset must be a non-negative int, got {describe(storage_offset)}", region=region
        )
    shape = _int_tuple(size, "size", region)
    strides = _int_tuple(stride, "stride", region)
    if len(shape) != len(strides):
        raise LegacyFormatError(f"tensor size {shape} and stride {strides} differ in rank", region=region)
    base = storage.tensor
    if dtype is not None:
        if not storage.untyped:
            raise LegacyFormatError("_rebuild_tensor_v3 needs an untyped storage", region=region)
        if dtype in _QUANTIZED_DTYPES or dtype.itemsize == 0:
            raise LegacyUnsupportedError(f"unsupported tensor kind: dtype {dtype}", region=region)
        if base.numel() % dtype.itemsize:
            raise LegacyFormatError(f"storage of {base.numel()} bytes is not a whole number of {dtype}", region=region)
        base = base.view(dtype) if base.numel() else torch.empty(0, dtype=dtype)
    elif storage.untyped:
        raise LegacyFormatError("an untyped storage needs _rebuild_tensor_v3 and a dtype", region=region)
    numel = base.numel()
    logical = 1
    last = storage_offset
    for n, s in zip(shape, strides, strict=True):
        logical *= n
        last += (n - 1) * s
    if logical == 0:
        if storage_offset > numel:
            raise LegacyFormatError(f"storage offset {storage_offset} is past the storage end {numel}", region=region)
        return empty_tensor(shape, base.dtype, region=region)
    if last >= numel:
        raise LegacyFormatError(
            f"view (offset {storage_offset}, size {shape}, stride {strides}) reaches element {last} "
            f"of a storage of {numel}",
            region=region,
        )
    if logical > numel and logical * base.element_size() > max_expanded_bytes:
        raise LegacyLimitError(
            "logical bytes of an expanded view", logical * base.element_size(), max_expanded_bytes, region=region
        )
    return torch.as_strided(base, shape, strides, storage_offset)


def check_arity(vm: PickleVM, args: tuple[Any, ...], name: str, *allowed: int) -> None:
    """Fail unless an interpreted call has one of the ``allowed`` argument counts."""
    if len(args) not in allowed:
        vm.fail(f"{name} takes {' or '.join(map(str, allowed))} arguments, got {len(args)}")


# -- the rebuild functions torch pickles name (interpreted, never called) -------------------------
def _storage(vm: PickleVM, value: Any) -> StorageRef:
    if not isinstance(value, StorageRef):
        vm.fail(f"tensor rebuild needs a storage, got {type(value).__name__}")
    return value


def _hooks(vm: PickleVM, requires_grad: Any, hooks: Any) -> None:
    if type(requires_grad) is not bool:
        vm.fail(f"requires_grad must be a bool, got {type(requires_grad).__name__}")
    if not isinstance(hooks, dict):
        vm.fail(f"backward_hooks must be a dict, got {type(hooks).__name__}")


def _view(vm: PickleVM, storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None) -> torch.Tensor:
    return rebuild_view(
        _storage(vm, storage),
        offset,
        size,
        stride,
        dtype=dtype,
        max_expanded_bytes=vm.limits.max_expanded_bytes,
        region=vm.region,
    )


def _rebuild_tensor(vm: PickleVM, args: tuple[Any, ...]) -> torch.Tensor:
    check_arity(vm, args, "_rebuild_tensor", 4)
    return _view(vm, args[0], args[1], args[2], args[3], None)


def _rebuild_tensor_v2(vm: PickleVM, args: tuple[Any, ...]) -> torch.Tensor:
    check_arity(vm, args, "_rebuild_tensor_v2", 6, 7)
    _hooks(vm, args[4], args[5])
    return _view(vm, args[0], args[1], args[2], args[3], None)


def _rebuild_tensor_v3(vm: PickleVM, args: tuple[Any, ...]) -> torch.Tensor:
    check_arity(vm, args, "_rebuild_tensor_v3", 7, 8)
    _hooks(vm, args[4], args[5])
    if not isinstance(args[6], torch.dtype):
        vm.fail(f"_rebuild_tensor_v3 dtype must be a torch dtype, got {type(args[6]).__name__}")
    return _view(vm, args[0], args[1], args[2], args[3], args[6])


def _rebuild_parameter(vm: PickleVM, args: tuple[Any, ...]) -> torch.Tensor:
    # Parameters come back as plain tensors: the state dict never holds Parameters.
    check_arity(vm, args, "_rebuild_parameter", 3)
    if not isinstance(args[0], torch.Tensor):
        vm.fail(f"_rebuild_parameter needs a tensor, got {type(args[0]).__name__}")
    _hooks(vm, args[1], args[2])
    return args[0]


def _rebuild_parameter_with_state(vm: PickleVM, args: tuple[Any, ...]) -> torch.Tensor:
    check_arity(vm, args, "_rebuild_parameter_with_state", 4)
    return _rebuild_parameter(vm, args[:3])


#: ``torch._utils`` function name -> its interpretation.
REBUILDS: Final = {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter_with_state,
}
