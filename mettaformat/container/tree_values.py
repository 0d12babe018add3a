"""The values of object trees that need rules of their own: inert object records, tensor references,
the ``$dtype`` and ``$device`` grammars, and what may be a ``$map`` key or a set member.

The grammars are fixed tables here, not whatever the running torch accepts, so that what a file may
say does not depend on the reader's build (``spec/FORMAT.md`` §9.2).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:  # torch is imported only where a value needs it: reading a header stays torch-free
    import torch

__all__ = ["DEVICE_TYPES", "DTYPE_NAMES", "MAX_DEVICE_INDEX", "MAX_KEYS_PER_HASH", "LegacyObject", "TensorRef",
           "check_keys", "dtypes_by_name", "key_problem", "parse_device"]


#: Every name a ``$dtype`` may hold (spec §9.2), fixed here rather than read from the running torch,
#: so that what a file may say does not depend on the build. Canonical names only, no aliases
#: (``float``, ``long``...). A name this build lacks is refused when read.
DTYPE_NAMES: Final = (
    "bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2",
    "qint8", "quint8", "qint32", "quint4x2", "quint2x4",
    "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16",
    "uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7",
    "int1", "int2", "int3", "int4", "int5", "int6", "int7",
)


@functools.cache
def dtypes_by_name() -> dict[str, torch.dtype]:
    """The names of :data:`DTYPE_NAMES` this torch build has, and its dtypes (imports torch on first use)."""
    import torch

    return {name: getattr(torch, name) for name in DTYPE_NAMES if isinstance(getattr(torch, name, None), torch.dtype)}

#: The device types a ``$device`` may name (spec §9.2), and the largest index (torch keeps it in 8 bits).
DEVICE_TYPES: Final = (
    "cpu", "cuda", "ipu", "xpu", "mkldnn", "opengl", "opencl", "ideep", "hip", "ve", "fpga", "maia", "xla", "lazy",
    "vulkan", "mps", "meta", "hpu", "mtia", "privateuseone",
)
MAX_DEVICE_INDEX: Final = 127
#: More distinct ``$map`` keys or set members sharing one hash value than this is refused: it is what
#: makes building a dict quadratic (integers n, n + (2^61 - 1), ... all hash alike).
MAX_KEYS_PER_HASH: Final = 8


@dataclass(eq=False)
class LegacyObject:
    """An inert record of an object found in a legacy pickle (or written back to one).

    Nothing is imported: ``module`` and ``name`` are the class path as the pickle spelled it.

    Attributes:
        module: module path of the class, e.g. ``"metta.agent.policy_record"``.
        name: class (or callable) name, e.g. ``"PolicyRecord"``.
        args: arguments the pickle passed to the constructor (``NEWOBJ``/``REDUCE``).
        state: what ``BUILD`` set (usually the instance ``__dict__``), or ``None``.
        items: key/value pairs set with ``SETITEM(S)`` (dict subclasses such as PolicyMetadata).
        listitems: values added with ``APPEND(S)`` (list subclasses).
        kind: how the object was created: ``"newobj"``, ``"reduce"`` or ``"global"`` (the class
            or function itself, not an instance).
    """

    module: str
    name: str
    args: tuple[Any, ...] = ()
    state: Any = None
    items: list[tuple[Any, Any]] = field(default_factory=list)
    listitems: list[Any] = field(default_factory=list)
    kind: str = "newobj"

    @property
    def class_path(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"LegacyObject({self.class_path}, kind={self.kind})"


@dataclass(frozen=True)
class TensorRef:
    """A reference to a tensor stored in a section, as found in a tree decoded without a resolver."""

    section: str
    name: str


def parse_device(text: object) -> torch.device | None:
    """The device a ``$device`` string names, by the spec's grammar (``TYPE`` or ``TYPE:INDEX``, the
    index a decimal 0 to 127 without leading zeros); None if it is not one."""
    if type(text) is not str or len(text) > 64:
        return None
    kind, sep, index = text.partition(":")
    if kind not in DEVICE_TYPES:
        return None
    if sep and not (index.isascii() and index.isdigit() and (index == "0" or index[0] != "0")
                    and int(index) <= MAX_DEVICE_INDEX):
        return None
    import torch

    return torch.device(kind, int(index)) if sep else torch.device(kind)


def key_problem(key: Any) -> str | None:
    """Why ``key`` cannot be a ``$map`` key or set member (spec §9.2), or None: keys are values with
    an equality every language can state. NaN equals nothing; lists, maps, sets and tensors are
    mutable or have no value equality."""
    if key is None or isinstance(key, (bool, int, str, bytes, LegacyObject)):
        return None
    if isinstance(key, float):
        return "NaN" if math.isnan(key) else None
    if isinstance(key, (tuple, frozenset)):
        return next(filter(None, map(key_problem, key)), None)
    import torch  # torch.Size is a tuple; only a dtype or device can still be a key here

    return None if isinstance(key, (torch.dtype, torch.device)) else f"a {type(key).__name__}"


def check_keys(keys: Iterable[Any]) -> None:
    """Raise ValueError for a key that may not be one, or too many keys sharing a hash value."""
    keys = list(keys)
    for key in keys:
        problem = key_problem(key)
        if problem is not None:
            raise ValueError(f"{problem} cannot be a map key or set member")
    if len(keys) > MAX_KEYS_PER_HASH:
        _, most = Counter(map(hash, keys)).most_common(1)[0]
        if most > MAX_KEYS_PER_HASH:
            raise ValueError(f"{most} keys share one hash value (at most {MAX_KEYS_PER_HASH})")


