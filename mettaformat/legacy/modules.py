"""State-dict recovery from a pickled ``nn.Module`` graph, without the module classes.

A pickled module is a ``LegacyObject`` whose BUILD state is the instance ``__dict__``, holding
``_parameters``, ``_buffers`` and ``_modules``. :func:`recover_module` mirrors
``Module.state_dict()`` (``Module._save_to_state_dict``, threat model PK31): parameters and
buffers that are not None, persistent buffers only, keys ``prefix + name``, children under
``prefix + child + "."``, shared submodules listed under every path (as torch does), and
tensors shared by identity. Traversal is iterative, so deep or cyclic graphs (PK12) cannot
exhaust the Python stack, and bounded by ``max_traversal`` nodes.

Tensors the graph holds outside the state dict (``initial_weights`` copies on Metta
components, non-persistent buffers, cached index tensors) are reported as ``legacy_tensors``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import torch

from mettaformat.container.tree import LegacyObject
from mettaformat.errors import LegacyLimitError
from mettaformat.legacy.limits import DEFAULT_LIMITS, LegacyLimits

__all__ = ["ModuleState", "is_module", "module_attrs", "module_dict", "recover_module", "state_slots"]

_LEAF_TYPES: Final = frozenset(
    {type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device}
)
_MODULE_KEYS: Final = frozenset({"_parameters", "_buffers", "_modules"})
#: A note added once per import: the state dict cannot hold what ``get_extra_state`` returns.
EXTRA_STATE_NOTE: Final = (
    "get_extra_state() is code and was not called: '<prefix>_extra_state' entries of custom "
    "modules, if their classes define one, are not recovered"
)


@dataclass(frozen=True)
class ModuleState:
    """What :func:`recover_module` found.

    Attributes:
        state_dict: what ``module.state_dict()`` would return, in the same order.
        legacy_tensors: tensors only the object graph holds, by dotted attribute path.
        module_classes: class path of every module visited, by dotted module path.
        notes: things that could not be recovered faithfully.
    """

    state_dict: dict[str, torch.Tensor]
    legacy_tensors: dict[str, torch.Tensor]
    module_classes: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def module_attrs(obj: Any) -> dict[str, Any] | None:
    """Return the instance ``__dict__`` of a pickled object, or None.

    BUILD state is the ``__dict__`` itself, or ``(dict, slots)`` for classes with slots.
    """
    if not isinstance(obj, LegacyObject):
        return None
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
        state = state[0]
    return state if isinstance(state, dict) else None


def is_module(obj: Any) -> bool:
    """True for a pickled ``nn.Module`` (a record whose state has module internals).

    Old torch versions lack some of the three dicts (PK31); one is enough.
    """
    attrs = module_attrs(obj)
    return attrs is not None and any(isinstance(attrs.get(k), dict) for k in _MODULE_KEYS)


def module_dict(attrs: dict[str, Any], key: str) -> dict[Any, Any]:
    """``attrs[key]`` (``_modules``, ``_parameters``, ``_buffers``) if it is a dict, else an empty one.

    A hostile or damaged graph may hold anything there; readers treat a non-dict as absent.
    """
    value = attrs.get(key)
    return value if isinstance(value, dict) else {}


def recover_module(root: Any, *, limits: LegacyLimits = DEFAULT_LIMITS) -> ModuleState:
    """Recover the state dict and graph-only tensors of a pickled module.

    Args:
        root: a value for which :func:`is_module` is true.
        limits: ``max_traversal`` bounds the nodes visited.

    Returns:
        The recovered :class:`ModuleState`.

    Raises:
        LegacyLimitError: the graph has more than ``limits.max_traversal`` nodes to visit.
    """
    budget = _Budget(limits.max_traversal)
    notes: list[str] = []
    classes: dict[str, str] = {}
    slots = state_slots(root, notes=notes, classes=classes, budget=budget)
    state = {key: holder[name] for key, holder, name, _ in slots}
    held = {id(t) for t in state.values()}
    extra = _graph_tensors(root, held, budget)
    return ModuleState(state, extra, classes, notes)


class _Budget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def spend(self) -> None:
        self.used += 1
        self.check()

    def check(self) -> None:
        if self.used > self.limit:
            raise LegacyLimitError("object graph nodes visited", self.used, self.limit, region="module graph")


def state_slots(
    root: Any, *, limits: LegacyLimits = DEFAULT_LIMITS, notes: list[str] | None = None,
    classes: dict[str, str] | None = None, budget: _Budget | None = None,
) -> list[tuple[str, dict[Any, Any], Any, bool]]:
    """Where each state-dict tensor of a pickled module lives, in ``Module.state_dict()`` order.

    Args:
        root: a pickled module.
        limits: ``max_traversal`` bounds the modules visited.
        notes: receives what was skipped (cycles, non-module children, non-tensor slots).
        classes: receives the class path of every module visited, by dotted module path.
        budget: a traversal budget shared with a later walk (default: a fresh one).

    Returns:
        ``(state-dict key, slot dict, name in it, is a parameter)`` per tensor.
    """
    budget = budget or _Budget(limits.max_traversal)
    notes = [] if notes is None else notes
    slots: list[tuple[str, dict[Any, Any], Any, bool]] = []
    on_path: set[int] = set()
    # ("enter", module, prefix) or ("exit", module, "") -- recursion made explicit.
    work: list[tuple[str, Any, str]] = [("enter", root, "")]
    while work:
        action, mod, prefix = work.pop()
        if action == "exit":
            on_path.discard(id(mod))
            continue
        budget.spend()
        if id(mod) in on_path:
            notes.append(f"module cycle at {prefix.rstrip('.') or '<root>'} skipped")
            continue
        attrs = module_attrs(mod)
        if attrs is None or not is_module(mod):
            notes.append(f"{prefix.rstrip('.')}: child is a {type(mod).__name__}, not a module; skipped")
            continue
        if classes is not None:
            classes[prefix.rstrip(".")] = mod.class_path
        on_path.add(id(mod))
        work.append(("exit", mod, ""))
        non_persistent = attrs.get("_non_persistent_buffers_set")
        skip = non_persistent if isinstance(non_persistent, (set, frozenset)) else frozenset()
        for kind in ("_parameters", "_buffers"):
            holder = module_dict(attrs, kind)
            for name, value in holder.items():
                if value is None or (kind == "_buffers" and name in skip):
                    continue
                if not isinstance(value, torch.Tensor):
                    notes.append(f"{prefix}{name}: {kind[1:-1]} is a {type(value).__name__}, not a tensor; skipped")
                    continue
                slots.append((f"{prefix}{name}", holder, name, kind == "_parameters"))
        children = [(n, c) for n, c in module_dict(attrs, "_modules").items() if c is not None]
        for name, child in reversed(children):
            work.append(("enter", child, f"{prefix}{name}."))
    return slots


#: A position in the object graph: ``(key, parent position)``, ``(_ROOT, None)`` for the root.
#: Keys are spelled with ``str()`` only for the few paths that name a found tensor.
_Node: TypeAlias = "tuple[Any, _Node | None]"
_ROOT: Final = object()


def _children(value: LegacyObject) -> list[tuple[Any, Any]]:
    # (name, child) pairs of a record, in the order (and under the names) paths are spelled.
    attrs = module_attrs(value)
    pairs: list[tuple[Any, Any]] = []
    if attrs is not None:
        modules = attrs.get("_modules")
        parameters = attrs.get("_parameters")
        buffers = attrs.get("_buffers")
        if isinstance(modules, dict) or isinstance(parameters, dict) or isinstance(buffers, dict):
            # A module (is_module): name submodules, parameters and buffers as state_dict does.
            for named in (modules, parameters, buffers):
                if isinstance(named, dict):
                    pairs += named.items()
            pairs += [kv for kv in attrs.items() if kv[0] not in _MODULE_KEYS]
            return pairs
    if attrs is not None:
        pairs.extend(attrs.items())
    elif value.state is not None:
        pairs.append(("state", value.state))
    pairs.extend((f"args.{i}", v) for i, v in enumerate(value.args))
    pairs.extend(value.items)
    pairs.extend(enumerate(value.listitems))
    return pairs


def _path(node: _Node) -> str:
    keys: list[Any] = []
    while node[0] is not _ROOT:
        keys.append(node[0])
        node = node[1]  # type: ignore[assignment]  # only the root's parent is None
    path = ""
    for key in reversed(keys):
        path = f"{path}.{key!s}" if path else str(key)
    return path


def _graph_tensors(root: Any, held: set[int], budget: _Budget) -> dict[str, torch.Tensor]:
    """Tensors reachable from ``root`` that are not in the state dict, by first path found.

    Depth-first, children in order; each container is visited once (cycles and shared
    subgraphs are cut by identity) and charged to ``budget``. Work items are
    ``(value, key, parent position)``; leaves are filtered out before they are pushed.
    """
    found: dict[str, torch.Tensor] = {}
    seen: set[int] = set(held)
    add = seen.add
    work: list[tuple[Any, Any, _Node | None]] = [(root, _ROOT, None)]
    pop = work.pop
    extend = work.extend
    tensor_type = torch.Tensor
    leaf = _LEAF_TYPES
    used = budget.used
    limit = budget.limit
    while work:
        value, key, parent = pop()
        cls = type(value)
        # Dicts (module internals, configs) are most of what gets pushed; scalars never are.
        if cls is not dict:
            if cls in leaf:
                continue
            if isinstance(value, tensor_type):
                if id(value) not in seen:
                    add(id(value))
                    found[_path((key, parent))] = value
                continue
            if not (cls is list or cls is tuple or isinstance(value, (dict, LegacyObject))):
                continue
        ident = id(value)
        if ident in seen:
            continue
        add(ident)
        used += 1
        if used > limit:
            budget.used = used
            budget.check()
        if not value and cls is not LegacyObject:
            continue
        node = (key, parent)
        if isinstance(value, dict):
            extend([(v, k, node) for k, v in reversed(value.items()) if type(v) not in leaf])
        elif cls is list or cls is tuple:
            indices = range(len(value) - 1, -1, -1)
            extend([(v, i, node) for i, v in zip(indices, reversed(value), strict=True) if type(v) not in leaf])
        else:
            extend([(v, k, node) for k, v in reversed(_children(value)) if type(v) not in leaf])
    budget.used = used
    return dict(sorted(found.items()))
