"""The fixed table of globals the importer interprets as data, and how REDUCE/BUILD apply.

A pickle names callables by ``(module, name)``. A handful of them (tensor rebuilds, storage
classes, dtypes, builtin containers, ``OrderedDict``, numpy reconstruction...) are
interpreted here by pure-Python code that validates its arguments; that code never calls the
named function. Every other name becomes an inert ``LegacyObject(kind="global")``, and calling
it records a ``LegacyObject(kind="reduce"|"newobj")`` holding the arguments (threat model PK1-PK7).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import torch

from mettaformat.container.tree import LegacyObject
from mettaformat.errors import LegacyUnsupportedError
from mettaformat.legacy import numpy_compat
from mettaformat.legacy.describe import describe
from mettaformat.legacy.tensors import (
    REBUILDS,
    STORAGE_CLASS_DTYPES,
    UNTYPED_STORAGE_CLASSES,
    StorageType,
    check_arity,
)

if TYPE_CHECKING:
    from mettaformat.legacy.unpickler import PickleVM

__all__ = [
    "Builtin",
    "RecordedDefaultDict",
    "build",
    "call",
    "extend_list",
    "interprets",
    "ordered_dict",
    "resolve_global",
    "set_items",
    "stub_call",
]

BuiltinFn = Callable[["PickleVM", tuple[Any, ...]], Any]


@dataclass(frozen=True, eq=False)
class Builtin:
    """An allowlisted global: a class path plus the pure-Python interpretation of calling it.

    Attributes:
        module: module as spelled in the pickle.
        name: attribute name as spelled in the pickle.
        fn: validates the arguments and returns the value the call stands for.
        is_type: True for classes that ``NEWOBJ`` may instantiate (containers).
    """

    module: str
    name: str
    fn: BuiltinFn
    is_type: bool = False

    @property
    def class_path(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"Builtin({self.class_path})"


class RecordedDefaultDict(dict[Any, Any]):
    """A ``collections.defaultdict`` from a pickle: a plain dict that remembers its factory.

    Attributes:
        default_factory: the factory as the pickle named it (a :class:`Builtin`, a
            ``LegacyObject`` global, or None). It is never called.
    """

    default_factory: Any = None


_DTYPES: Final[dict[str, torch.dtype]] = {k: v for k, v in vars(torch).items() if isinstance(v, torch.dtype)}
_TEXT_CODECS: Final = frozenset({"latin1", "latin-1", "latin_1", "iso-8859-1", "utf-8", "utf8", "ascii"})


# -- argument helpers ---------------------------------------------------------------------------
def _iterable(vm: PickleVM, value: Any, name: str, *, hashed: bool = False) -> Any:
    # Copying a container from the memo costs its length, every time (a GET is two bytes).
    if not isinstance(value, (list, tuple, set, frozenset, dict)):
        vm.fail(f"{name} of a {type(value).__name__}")
    vm.charge(len(value))
    if hashed and not isinstance(value, (dict, set, frozenset)):  # those reuse stored hashes
        vm.charge_keys(value)
    return value


_DCP_RECORD_MODULES: Final = frozenset(
    {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"}
)


def _is_tensor_kind_we_refuse(module: str, name: str) -> bool:
    # Sparse, quantized, meta, nested, wrapper-subclass, device-numpy and DTensor rebuilds
    # (threat model PK25). Allowlisted rebuilds never reach this check.
    if module == "torch" or module.startswith("torch."):
        if name.startswith("_rebuild"):
            return True
        if module.startswith(("torch.distributed", "torch.nested", "torch._subclasses")):
            # DCP's .metadata records are plain dataclasses, recorded inertly like any class
            return module not in _DCP_RECORD_MODULES
    return False


def _rebuild_from_type_v2(vm: PickleVM, args: tuple[Any, ...]) -> Any:
    # Tensor subclasses with Python state: unwrap to the inner rebuild (as candle and
    # llama.cpp do); the subclass and its state are not kept.
    check_arity(vm, args, "_rebuild_from_type_v2", 4)
    func, new_type, inner, _state = args
    if isinstance(new_type, LegacyObject) and _is_tensor_kind_we_refuse(new_type.module, new_type.name):
        raise LegacyUnsupportedError(
            f"unsupported tensor kind: {new_type.class_path}", region=vm.region, offset=vm.offset
        )
    if type(inner) is not tuple:
        vm.fail("_rebuild_from_type_v2 arguments must be a tuple")
    return call(vm, func, inner, "reduce")


# -- builtins -----------------------------------------------------------------------------------
def _container(kind: type) -> BuiltinFn:
    def fn(vm: PickleVM, args: tuple[Any, ...]) -> Any:
        check_arity(vm, args, kind.__name__, 0, 1)
        items = _iterable(vm, args[0], kind.__name__, hashed=kind in (set, frozenset)) if args else ()
        if kind is dict and isinstance(items, (list, tuple)):
            vm.charge_keys(p[0] for p in items if type(p) is tuple and p)
        return vm.make_tuple(tuple(items)) if kind is tuple else kind(items)

    return fn


def ordered_dict(vm: PickleVM, args: tuple[Any, ...]) -> dict[Any, Any]:
    """``collections.OrderedDict(*args)`` as a plain dict, remembered as one for ``BUILD``."""
    check_arity(vm, args, "OrderedDict", 0, 1)
    out: dict[Any, Any] = {}
    if args:
        items = _iterable(vm, args[0], "OrderedDict")
        if isinstance(items, (list, tuple)):
            vm.charge_keys(p[0] for p in items if type(p) is tuple and p)
        out = dict(items)
    vm.ordered_dicts.add(id(out))
    return out


def _defaultdict(vm: PickleVM, args: tuple[Any, ...]) -> RecordedDefaultDict:
    check_arity(vm, args, "defaultdict", 0, 1)
    d = RecordedDefaultDict()
    d.default_factory = args[0] if args else None
    return d


def _object(vm: PickleVM, args: tuple[Any, ...]) -> LegacyObject:
    return LegacyObject("builtins", "object", args=args, kind="reduce")


def _bytes_like(kind: type) -> BuiltinFn:
    def fn(vm: PickleVM, args: tuple[Any, ...]) -> Any:
        check_arity(vm, args, kind.__name__, 0, 1, 2)
        if not args:
            return kind()
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
            vm.charge(len(args[0]))  # a copy of a value the memo may hand out many times
            return kind(args[0])
        return kind(_encode(vm, args))

    return fn


def _encode(vm: PickleVM, args: tuple[Any, ...]) -> bytes:
    # Protocol 2 stores bytes as _codecs.encode(<latin-1 text>, "latin1"). Only text codecs
    # are allowed: "zlib_codec" or "bz2_codec" would make this a decompression bomb.
    check_arity(vm, args, "_codecs.encode", 1, 2)
    text, encoding = (args[0], args[1]) if len(args) == 2 else (args[0], "utf-8")
    if type(text) is not str or type(encoding) is not str or encoding.lower() not in _TEXT_CODECS:
        vm.fail(f"_codecs.encode only accepts text with a text codec, got {type(text).__name__}/{describe(encoding)}")
    vm.charge(len(text))  # the memo may hand out the same text many times
    return text.encode(encoding.lower(), "surrogatepass" if "utf" in encoding.lower() else "strict")


def _number(kind: type) -> BuiltinFn:
    def fn(vm: PickleVM, args: tuple[Any, ...]) -> Any:
        check_arity(vm, args, kind.__name__, 1, 2) if kind is complex else check_arity(vm, args, kind.__name__, 1)
        if not all(type(a) in (int, float) for a in args):
            vm.fail(f"{kind.__name__}() of a non-number")
        return kind(*args)

    return fn


def _size(vm: PickleVM, args: tuple[Any, ...]) -> torch.Size:
    check_arity(vm, args, "torch.Size", 0, 1)
    dims = args[0] if args else ()
    if not isinstance(dims, (tuple, list)) or not all(type(d) is int and 0 <= d < (1 << 62) for d in dims):
        vm.fail("torch.Size needs non-negative ints")
    vm.charge(len(dims))
    return torch.Size(dims)


def _device(vm: PickleVM, args: tuple[Any, ...]) -> Any:
    # Any location string is accepted and recorded; tensors always load to CPU (PK27).
    check_arity(vm, args, "torch.device", 1, 2)
    if type(args[0]) is not str or len(args[0]) > 64 or (len(args) == 2 and type(args[1]) is not int):
        vm.fail("torch.device needs a short str and an optional int index")
    try:
        return torch.device(*args)
    except (RuntimeError, ValueError, TypeError):
        return LegacyObject("torch", "device", args=args, kind="reduce")


def _reconstructor(vm: PickleVM, args: tuple[Any, ...]) -> LegacyObject:
    # copyreg._reconstructor(cls, base, state): object.__new__(cls) or base.__new__(cls, state).
    check_arity(vm, args, "copyreg._reconstructor", 3)
    cls, base, state = args
    obj = stub_call(vm, cls, (), "newobj")
    if state is None:
        return obj
    if isinstance(base, Builtin) and base.name == "dict" and isinstance(state, dict):
        vm.charge(len(state))
        obj.items.extend(state.items())
    elif isinstance(base, Builtin) and base.name == "list" and isinstance(state, list):
        vm.charge(len(state))
        obj.listitems.extend(state)
    else:
        obj.args = (state,)
    return obj


def _newobj(vm: PickleVM, args: tuple[Any, ...]) -> Any:
    # copyreg.__newobj__(cls, *args) is protocol 0/1's spelling of NEWOBJ.
    if not args:
        vm.fail("copyreg.__newobj__ without a class")
    vm.charge(len(args))
    return call(vm, args[0], vm.make_tuple(args[1:]), "newobj")


_TABLE: dict[tuple[str, str], tuple[BuiltinFn, bool]] = {
    **{("torch._utils", name): (fn, False) for name, fn in REBUILDS.items()},
    ("torch._tensor", "_rebuild_from_type_v2"): (_rebuild_from_type_v2, False),
    ("torch", "Size"): (_size, True),
    ("torch", "device"): (_device, True),
    ("collections", "OrderedDict"): (ordered_dict, True),
    ("collections", "defaultdict"): (_defaultdict, True),
    ("_codecs", "encode"): (_encode, False),
    ("copy_reg", "_reconstructor"): (_reconstructor, False),
    ("copyreg", "_reconstructor"): (_reconstructor, False),
    ("copy_reg", "__newobj__"): (_newobj, False),
    ("copyreg", "__newobj__"): (_newobj, False),
}
for _mod in ("builtins", "__builtin__"):
    for _kind in (set, frozenset, list, tuple, dict):
        _TABLE[(_mod, _kind.__name__)] = (_container(_kind), True)
    _TABLE[(_mod, "object")] = (_object, True)
    _TABLE[(_mod, "bytes")] = (_bytes_like(bytes), True)
    _TABLE[(_mod, "bytearray")] = (_bytes_like(bytearray), True)
    _TABLE[(_mod, "int")] = (_number(int), True)
    _TABLE[(_mod, "long")] = (_number(int), True)
    _TABLE[(_mod, "float")] = (_number(float), True)
    _TABLE[(_mod, "complex")] = (_number(complex), True)
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _TABLE[(_mod, "_reconstruct")] = (numpy_compat.reconstruct, False)
    _TABLE[(_mod, "scalar")] = (numpy_compat.scalar, False)
_TABLE[("numpy", "dtype")] = (numpy_compat.dtype, True)


def interprets(module: str, name: str) -> bool:
    """True if the importer interprets ``module.name`` as data (it never calls any global)."""
    return not isinstance(resolve_global(module, name), LegacyObject)


def resolve_global(module: str, name: str) -> Any:
    """Map a class path from a pickle to the inert value it stands for.

    Args:
        module: module path as spelled (opaque: dotted names are never walked, PK4).
        name: attribute name as spelled.

    Returns:
        A :class:`Builtin`, a :class:`StorageType`, a ``torch.dtype``, or a
        ``LegacyObject(module, name, kind="global")`` for everything else.
    """
    entry = _TABLE.get((module, name))
    if entry is not None:
        return Builtin(module, name, entry[0], entry[1])
    if module == "torch":
        if name in STORAGE_CLASS_DTYPES:
            return StorageType(f"torch.{name}", STORAGE_CLASS_DTYPES[name])
        if name in _DTYPES:
            return _DTYPES[name]
    if (module, name) in UNTYPED_STORAGE_CLASSES:
        return StorageType(f"{module}.{name}", torch.uint8, untyped=True)
    return LegacyObject(module, name, kind="global")


def call(vm: PickleVM, func: Any, args: Any, how: str) -> Any:
    """Interpret ``REDUCE`` (``how="reduce"``) or ``NEWOBJ`` (``how="newobj"``).

    Raises:
        LegacyFormatError: arguments that are not a tuple, or wrong arity/types for an
            allowlisted function (PK7), or a call on something that is not a class.
        LegacyUnsupportedError: sparse/quantized/meta/nested/DTensor rebuilds (PK25).
    """
    if type(args) is not tuple:
        vm.fail(f"{how} arguments must be a tuple, got {type(args).__name__}")
    if isinstance(func, Builtin):
        if how == "newobj" and not func.is_type:
            vm.fail(f"NEWOBJ on {func.class_path}, which is not a class")
        return func.fn(vm, args)
    return stub_call(vm, func, args, how)


def stub_call(vm: PickleVM, cls: Any, args: tuple[Any, ...], how: str) -> LegacyObject:
    """Record a call of a non-allowlisted class as an inert ``LegacyObject``."""
    if not isinstance(cls, LegacyObject) or cls.kind != "global":
        vm.fail(f"{how} on a {type(cls).__name__}, which is not a recorded class")
    if _is_tensor_kind_we_refuse(cls.module, cls.name):
        raise LegacyUnsupportedError(f"unsupported tensor kind: {cls.class_path}", region=vm.region, offset=vm.offset)
    return LegacyObject(cls.module, cls.name, args=args, kind=how)


def build(vm: PickleVM, obj: Any, state: Any) -> None:
    """Interpret ``BUILD``: the state is stored as data and never applied by code (PK6)."""
    if isinstance(obj, LegacyObject):
        if obj.state is None:
            obj.state = state
        elif type(obj.state) is dict and type(state) is dict:
            vm.charge(len(state))
            obj.state.update(state)
        else:
            vm.fail(f"second BUILD on {obj.class_path}")
    elif isinstance(obj, dict) and (type(obj) is not dict or id(obj) in vm.ordered_dicts) and (
        state is None or isinstance(state, dict)
    ):
        # OrderedDict instance attributes, e.g. a state dict's ``_metadata`` (per-module
        # versions). A plain dict cannot carry them; they are dropped. A dict that was never an
        # OrderedDict has no instance state at all: BUILD on it fails, as in CPython.
        vm.charge(len(state or ()))
    else:
        vm.fail(f"BUILD on a {type(obj).__name__}")


def extend_list(vm: PickleVM, target: Any, items: list[Any]) -> None:
    """Interpret ``APPEND``/``APPENDS`` on a list or a recorded list subclass."""
    if type(target) is list:
        target.extend(items)
    elif isinstance(target, LegacyObject):
        target.listitems.extend(items)
    else:
        vm.fail(f"APPEND on a {type(target).__name__}")


def set_items(vm: PickleVM, target: Any, items: list[Any]) -> None:
    """Interpret ``SETITEM``/``SETITEMS`` (``items`` alternates keys and values)."""
    pairs = zip(items[::2], items[1::2], strict=True)
    if isinstance(target, dict):
        vm.charge_keys(items[::2])
        for k, v in pairs:
            target[k] = v
    elif isinstance(target, LegacyObject):
        target.items.extend(pairs)
    else:
        vm.fail(f"SETITEM on a {type(target).__name__}")
