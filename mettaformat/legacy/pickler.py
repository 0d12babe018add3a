"""A ``pickle_module`` for ``torch.save`` that writes inert legacy records back as what they recorded.

The importer never imports the classes a legacy file names: it records each object as a
:class:`~mettaformat.container.tree.LegacyObject` (class path, constructor arguments, BUILD
state, dict and list items). :class:`LegacyPickler` writes such a record back with exactly the
opcodes a pickle of the live object would use -- ``GLOBAL module name``, the arguments,
``NEWOBJ`` or ``REDUCE``, ``SETITEMS``/``APPENDS``, ``BUILD`` -- again without importing
anything, so a v1 ``PolicyRecord`` file can be rebuilt on a machine that lacks Metta.

It subclasses the pure-Python ``pickle._Pickler`` because only that one has a per-type
``dispatch`` table and lets a subclass emit raw opcodes. Tensors still go through torch's own
``Tensor.__reduce_ex__`` and ``persistent_id`` path, so the result is an ordinary torch zip.
"""

from __future__ import annotations

import pickle
import re
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final

import torch

from mettaformat.container.tree import LegacyObject
from mettaformat.legacy.allowlist import Builtin, RecordedDefaultDict
from mettaformat.legacy.graph import to_storable
from mettaformat.legacy.tensors import StorageRef, StorageType

__all__ = ["DEFAULT_PROTOCOL", "LegacyPickler", "PickleOptions", "class_pairs", "class_paths", "pickle_module"]

#: torch.save's default protocol, and the one every Metta v1 file used.
DEFAULT_PROTOCOL: Final = 2
_BATCH: Final = 1000
#: What a GLOBAL line may name: dotted identifiers only (a newline would inject opcodes).
_PATH: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*\Z")

if TYPE_CHECKING:

    class _PicklerBase(pickle._Pickler):
        """The undocumented members of ``pickle._Pickler`` this module relies on."""

        memo: dict[int, tuple[int, Any]]

        def write(self, data: bytes) -> None: ...
        def memoize(self, obj: Any) -> None: ...
        def get(self, i: int) -> bytes: ...
        def save(self, obj: Any, save_persistent_id: bool = True) -> None: ...

else:
    _PicklerBase = pickle._Pickler


@dataclass
class PickleOptions:
    """What one export substitutes while pickling.

    Attributes:
        replace: ``id(original) -> substitute``: every reference to the original object is
            written as the substitute (new tensors for a module's state-dict slots, an
            edited ``PolicyRecord``...). The originals must stay alive while pickling.
        parameters: ids of (substituted) tensors to write as ``nn.Parameter``; the importer
            unwraps parameters into plain tensors.
        ordered: ids of plain dicts to write as ``collections.OrderedDict`` (the importer reads
            both as dicts; ``nn.Module`` hook tables must come back ordered).
        numpy_core: module that holds ``_reconstruct``/``scalar``: ``numpy.core`` (numpy 1.x;
            numpy 2 still resolves it) or ``numpy._core`` (numpy 2 only), as the source used.
    """

    replace: dict[int, Any] = field(default_factory=dict)
    parameters: set[int] = field(default_factory=set)
    ordered: set[int] = field(default_factory=set)
    numpy_core: str = "numpy.core"


class _ClassRef:
    """A class or function named by path, written as ``GLOBAL`` (one instance per path, for the memo)."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


class LegacyPickler(_PicklerBase):
    """Pickles ``LegacyObject`` records (and the importer's other stand-ins) as the objects they recorded.

    Use it through :func:`pickle_module` so that torch subclasses it for ``persistent_id``.
    """

    options: ClassVar[PickleOptions] = PickleOptions()
    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def __init__(self, file: Any, protocol: int | None = None, **kwargs: Any) -> None:
        super().__init__(file, protocol, **kwargs)
        self._classes: dict[tuple[str, str], _ClassRef] = {}

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        substitute = self.options.replace.get(id(obj))
        super().save(obj if substitute is None else substitute, save_persistent_id)

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor) and id(obj) in self.options.parameters:
            # detach(): a new tensor object on the same storage, so this branch is not re-entered.
            return torch._utils._rebuild_parameter, (obj.detach(), True, OrderedDict())
        if type(obj) is dict and id(obj) in self.options.ordered:
            # What OrderedDict.__reduce__ returns: REDUCE OrderedDict () + SETITEMS.
            return OrderedDict, (), None, None, iter(obj.items())
        return NotImplemented

    # -- writers for the importer's stand-ins --------------------------------------------------
    def _global(self, module: str, name: str) -> None:
        if not (_PATH.match(module) and _PATH.match(name)):
            raise pickle.PicklingError(f"cannot write a GLOBAL for class path {module!r} {name!r}")
        ref = self._classes.setdefault((module, name), _ClassRef(module, name))
        known = self.memo.get(id(ref))
        if known is not None:
            self.write(self.get(known[0]))
            return
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(ref)

    def _call(self, obj: Any, module: str, name: str, args: tuple[Any, ...], opcode: bytes) -> None:
        self._global(module, name)
        self.save(args)
        self.write(opcode)
        if id(obj) in self.memo:  # reached through its own arguments: keep the first copy (as save_reduce)
            self.write(pickle.POP + self.get(self.memo[id(obj)][0]))
        else:
            self.memoize(obj)

    def _setitems(self, items: list[tuple[Any, Any]]) -> None:
        for i in range(0, len(items), _BATCH):
            self.write(pickle.MARK)
            for k, v in items[i : i + _BATCH]:
                self.save(k)
                self.save(v)
            self.write(pickle.SETITEMS)

    def _appends(self, values: list[Any]) -> None:
        for i in range(0, len(values), _BATCH):
            self.write(pickle.MARK)
            for v in values[i : i + _BATCH]:
                self.save(v)
            self.write(pickle.APPENDS)

    def save_legacy_object(self, obj: LegacyObject) -> None:
        if obj.kind == "global":
            self._global(obj.module, obj.name)
            self.memo[id(obj)] = self.memo[id(self._classes[(obj.module, obj.name)])]
            return
        storage = _storage(obj)
        if storage is not None:
            self.save(storage)  # torch's persistent_id path; storages are not memoized by pickle
            return
        module, name = obj.module, obj.name
        if module == "numpy" and obj.kind == "reduce" and name in ("ndarray", "scalar"):
            # The importer names arrays and scalars by their type; the pickle called these.
            module, name = f"{self.options.numpy_core}.multiarray", "_reconstruct" if name == "ndarray" else "scalar"
        self._call(obj, module, name, tuple(obj.args), pickle.NEWOBJ if obj.kind == "newobj" else pickle.REDUCE)
        if obj.listitems:
            self._appends(obj.listitems)
        if obj.items:
            self._setitems(obj.items)
        if obj.state is not None:
            self.save(obj.state)
            self.write(pickle.BUILD)

    def save_defaultdict(self, obj: RecordedDefaultDict) -> None:
        factory = () if obj.default_factory is None else (obj.default_factory,)
        self._call(obj, "collections", "defaultdict", factory, pickle.REDUCE)
        if obj:
            self._setitems(list(obj.items()))

    def save_class_path(self, obj: Builtin | StorageType) -> None:
        module, _, name = obj.class_path.rpartition(".")
        self._global(module, name)

    def save_storage(self, obj: StorageRef) -> None:
        self.save(to_storable(obj))


LegacyPickler.dispatch.update(
    {
        LegacyObject: LegacyPickler.save_legacy_object,
        RecordedDefaultDict: LegacyPickler.save_defaultdict,
        Builtin: LegacyPickler.save_class_path,
        StorageType: LegacyPickler.save_class_path,
        StorageRef: LegacyPickler.save_storage,
    }
)


def _storage(obj: LegacyObject) -> torch.storage.TypedStorage | torch.UntypedStorage | None:
    """The live storage a ``to_storable`` storage record stands for, or None."""
    if obj.module != "torch" or obj.kind != "reduce" or len(obj.args) != 1 or not obj.name.endswith("Storage"):
        return None
    t = obj.args[0]
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        return None
    whole = t.storage_offset() == 0 and t.numel() * t.element_size() == t.untyped_storage().nbytes()
    t = t if whole else t.clone()  # a slice of a larger buffer must not drag the buffer along
    if obj.name == "UntypedStorage":
        return t.untyped_storage()
    typed: torch.storage.TypedStorage = torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
        wrap_storage=t.untyped_storage(), dtype=t.dtype, _internal=True
    )
    return typed


def pickle_module(options: PickleOptions) -> Any:
    """A module-like object for ``torch.save(..., pickle_module=...)`` bound to ``options``.

    Args:
        options: the substitutions for this one save.

    Returns:
        An object whose ``Pickler`` is a :class:`LegacyPickler` subclass using ``options``.
    """
    bound = type("BoundLegacyPickler", (LegacyPickler,), {"options": options})
    return types.SimpleNamespace(__name__=__name__, Pickler=bound, PicklingError=pickle.PicklingError)


def class_paths(value: Any) -> list[str]:
    """Class paths of the ``LegacyObject`` nodes reachable from ``value`` (what loading it will import).

    Args:
        value: any tree or graph.

    Returns:
        Sorted, distinct ``module.name`` strings.
    """
    return sorted(f"{m}.{n}" for m, n in class_pairs(value))


def class_pairs(value: Any) -> set[tuple[str, str]]:
    """``(module, name)`` of every ``LegacyObject`` reachable from ``value``."""
    found: set[tuple[str, str]] = set()
    seen: set[int] = set()
    work: list[Any] = [value]
    while work:
        v = work.pop()
        if id(v) in seen or isinstance(v, (str, bytes, int, float, torch.Tensor)) or v is None:
            continue
        seen.add(id(v))
        if isinstance(v, LegacyObject):
            found.add((v.module, v.name))
            work.extend((v.args, v.state, v.items, v.listitems))
        elif isinstance(v, dict):
            work.extend(v.keys())
            work.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            work.extend(v)
    return found
