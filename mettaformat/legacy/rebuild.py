"""Write a :class:`Checkpoint`'s current values into its preserved legacy object graph.

The graph (``ckpt.legacy_graph``) is the template of a v1/v2-full file: it holds every class
path, attribute and graph-only tensor that the hub does not model. The hub's own fields win
over it: the state dict is written into the policy module's ``_parameters``/``_buffers`` slots,
and ``name``/``uri``/``metadata`` into the ``PolicyRecord``. Nothing is changed in place:
tensors are substituted while pickling (:class:`~mettaformat.legacy.pickler.PickleOptions`)
and edited nodes are shallow copies. A value that equals what the importer read from the
graph keeps the graph's original spelling (a numpy scalar stays a numpy scalar).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import torch

from mettaformat.checkpoint import Checkpoint
from mettaformat.container.tree import LegacyObject
from mettaformat.legacy.graph import graph_equal
from mettaformat.legacy.metta import plain_metadata
from mettaformat.legacy.modules import is_module, module_attrs, state_slots
from mettaformat.legacy.pickler import PickleOptions

__all__ = [
    "METADATA_KEYS",
    "POLICY_KEYS",
    "graph_policy",
    "is_policy_record",
    "module_hook_dicts",
    "patch_record",
    "substitute_tensors",
    "synthesize_record",
]

#: Where PolicyRecords of each era keep their metadata and policy (same order as the importer).
METADATA_KEYS: Final = ("_metadata", "metadata", "checkpoint", "meta_data", "_meta_data", "_checkpoint")
POLICY_KEYS: Final = ("_cached_policy", "_policy", "policy_cache")
_REQUIRED: Final = ("agent_step", "epoch", "generation", "train_time")
_RECORD_CLASS: Final = ("metta.agent.policy_record", "PolicyRecord")
_METADATA_CLASS: Final = ("metta.agent.policy_metadata", "PolicyMetadata")


def is_policy_record(graph: Any) -> bool:
    """True for a v1 ``PolicyRecord`` graph (any era)."""
    return isinstance(graph, LegacyObject) and graph.name == "PolicyRecord" and module_attrs(graph) is not None


def graph_policy(graph: Any) -> Any:
    """The pickled policy module inside a legacy graph (v1 record, v2 full-model dict or bare module), or None."""
    if is_policy_record(graph):
        attrs = module_attrs(graph) or {}
        candidate = next((attrs[k] for k in POLICY_KEYS if attrs.get(k) is not None), None)
    elif isinstance(graph, dict):
        candidate = graph.get("model")
    else:
        candidate = graph
    return candidate if is_module(candidate) else None


def module_hook_dicts(graph: Any) -> set[int]:
    """Ids of the hook tables (``_forward_hooks``...) of every pickled module in ``graph``.

    ``nn.Module`` creates them as ``OrderedDict`` (``register_*_hook(prepend=True)`` calls
    ``move_to_end``); the importer reads them as plain dicts.
    """
    found: set[int] = set()
    seen: set[int] = set()
    work: list[Any] = [graph]
    while work:
        v = work.pop()
        if id(v) in seen or not isinstance(v, (LegacyObject, dict, list, tuple)):
            continue
        seen.add(id(v))
        if isinstance(v, LegacyObject):
            attrs = module_attrs(v)
            if attrs is not None and is_module(v):
                found.update(id(x) for k, x in attrs.items() if type(x) is dict and k.startswith("_") and "hooks" in k)
            work.extend((v.args, v.state, v.items, v.listitems))
        elif isinstance(v, dict):
            work.extend(v.values())
        else:
            work.extend(v)
    return found


def _state_slots(root: Any) -> dict[str, tuple[dict[Any, Any], str, bool]]:
    """``state-dict key -> (slot dict, name, is_parameter)``, in ``Module.state_dict()`` order."""
    out: dict[str, tuple[dict[Any, Any], str, bool]] = {}
    for key, holder, name, is_param in state_slots(root):
        out.setdefault(key, (holder, name, is_param))
    return out


def substitute_tensors(
    module: Any,
    tensors: Mapping[str, torch.Tensor],
    options: PickleOptions,
    not_carried: list[str],
    notes: list[str],
) -> None:
    """Arrange for ``tensors`` to be pickled in the state-dict slots of the graph module ``module``.

    Args:
        module: a pickled module (``is_module`` is true).
        tensors: the checkpoint's state dict.
        options: receives the substitutions and the ids of tensors to write as parameters.
        not_carried: receives the keys the graph has no slot for.
        notes: receives slots kept from the graph and tied slots given different tensors.
    """
    slots = _state_slots(module)
    chosen: dict[int, torch.Tensor] = {}
    for key, new in tensors.items():
        slot = slots.get(key)
        if slot is None or not isinstance(slot[0][slot[1]], torch.Tensor):
            not_carried.append(f"tensor {key!r}: the policy object graph has no slot for it")
            continue
        old = slot[0][slot[1]]
        if old is new:
            continue
        first = chosen.setdefault(id(old), new)
        if first is not new:
            notes.append(f"tensor {key!r} is tied to another slot in the object graph; written tied to that slot")
            continue
        if old.shape != new.shape or old.dtype != new.dtype:
            notes.append(f"tensor {key!r} changed from {old.dtype}{list(old.shape)} to {new.dtype}{list(new.shape)}")
        options.replace[id(old)] = new
    for key, (holder, name, is_param) in slots.items():
        value = holder[name]
        if key not in tensors:
            notes.append(f"tensor {key!r} is not in the checkpoint's state dict; the object graph's copy was kept")
        if is_param:
            options.parameters.add(id(chosen.get(id(value), value)))


def _merged_pairs(pairs: list[tuple[Any, Any]], wanted: dict[str, Any]) -> list[tuple[Any, Any]]:
    """``pairs`` edited to hold ``wanted``: equal values keep their original spelling and order."""
    out: list[tuple[Any, Any]] = []
    for k, v in pairs:
        if k not in wanted:
            continue
        plain = plain_metadata({k: v}).get(k, v)
        out.append((k, v if graph_equal(plain, wanted[k]) else wanted[k]))
    have = {k for k, _ in out}
    out.extend((k, v) for k, v in wanted.items() if k not in have)
    return out


def _metadata_node(original: Any, wanted: dict[str, Any], *, policy_metadata: bool) -> Any:
    """The metadata node to write: ``original`` if it already says ``wanted``, else an edited copy."""
    if original is not None and graph_equal(plain_metadata(original), wanted):
        return original
    if isinstance(original, LegacyObject):
        state = original.state if isinstance(original.state, dict) else {}
        pairs = _merged_pairs([*state.items(), *original.items], wanted)
        in_state = [(k, v) for k, v in pairs if k in state]
        node = LegacyObject(original.module, original.name, args=original.args, kind=original.kind)
        node.state = dict(in_state) if isinstance(original.state, dict) else original.state
        node.items = [(k, v) for k, v in pairs if k not in state]
        node.listitems = list(original.listitems)
        return node
    if isinstance(original, dict):
        return dict(_merged_pairs(list(original.items()), wanted))
    if policy_metadata:
        first = [k for k in _REQUIRED if k in wanted]
        items = [(k, wanted[k]) for k in first] + [(k, v) for k, v in wanted.items() if k not in first]
        return LegacyObject(*_METADATA_CLASS, items=items, kind="newobj")
    return dict(wanted)


def patch_record(
    ckpt: Checkpoint, record: LegacyObject, *, model: torch.nn.Module | None, notes: list[str]
) -> LegacyObject:
    """A copy of the v1 ``record`` holding ``ckpt``'s name, uri and metadata (and ``model`` if given).

    Args:
        ckpt: the checkpoint whose values win.
        record: the preserved ``PolicyRecord`` (``is_policy_record`` is true); not modified.
        model: a live module to pickle instead of the graph's policy.
        notes: receives what was changed.

    Returns:
        The record to pickle.
    """
    attrs = dict(module_attrs(record) or {})
    name_key = "run_name" if "run_name" in attrs or "name" not in attrs else "name"
    for key, value in ((name_key, ckpt.name), ("uri", ckpt.uri)):
        if value is not None and attrs.get(key) != value:
            attrs[key] = value
            notes.append(f"PolicyRecord.{key} set to {value!r}")
    md_key = next((k for k in METADATA_KEYS if attrs.get(k) is not None), None)
    era_a = record.module != _RECORD_CLASS[0]
    original = attrs.get(md_key) if md_key else None
    node = _metadata_node(original, dict(ckpt.metadata), policy_metadata=not era_a)
    if node is not original:
        attrs[md_key or ("metadata" if era_a else "_metadata")] = node
        notes.append("metadata written from the checkpoint (it differs from the preserved object graph)")
    if model is not None:
        attrs[next((k for k in POLICY_KEYS if k in attrs), "_policy" if era_a else "_cached_policy")] = model
    out = LegacyObject(record.module, record.name, args=record.args, kind=record.kind)
    out.items, out.listitems = list(record.items), list(record.listitems)
    state = record.state
    out.state = (attrs, state[1]) if isinstance(state, tuple) else attrs
    return out


def synthesize_record(ckpt: Checkpoint, policy: Any, name: str, uri: str) -> LegacyObject:
    """An era-D ``metta.agent.policy_record.PolicyRecord`` around ``policy`` (docs/legacy-formats.md 1.2).

    Args:
        ckpt: supplies the metadata.
        policy: a live ``nn.Module`` or a pickled module graph.
        name: ``run_name``.
        uri: ``uri``.

    Returns:
        The record: ``__dict__`` = ``_policy_store, run_name, uri, _metadata, _cached_policy``.
    """
    metadata = _metadata_node(None, dict(ckpt.metadata), policy_metadata=True)
    state = {"_policy_store": None, "run_name": name, "uri": uri, "_metadata": metadata, "_cached_policy": policy}
    return LegacyObject(*_RECORD_CLASS, state=state, kind="newobj")
