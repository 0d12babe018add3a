"""Recognisers for Metta's legacy checkpoint shapes (docs/legacy-formats.md), producing a :class:`Checkpoint`.

Shapes, tried in order:

* ``v1-policy-record`` -- a pickled ``PolicyRecord`` (eras A0-D): name under ``name`` or
  ``run_name``, metadata under ``metadata``/``_metadata``/``checkpoint`` (a dict or a
  ``PolicyMetadata`` dict subclass), the policy under ``_policy``/``_cached_policy``/
  ``policy_cache``;
* ``v2-state-dict`` / ``v2-full-model`` -- PR #973's dicts with ``checkpoint_format_version``
  and ``model_state_dict`` or ``model`` (docs/legacy-formats.md 2.1);
* ``trainer-state`` -- ``trainer_state.pt`` dicts of every era (docs/legacy-formats.md 3);
* ``legacy-dict`` -- dicts with ``model_state_dict``/``state_dict`` but no version;
* ``state-dict`` -- a bare mapping of names to tensors;
* ``module`` -- a bare pickled ``nn.Module`` (era E).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from mettaformat.checkpoint import Checkpoint, TrainingState
from mettaformat.container.tree import LegacyObject
from mettaformat.errors import LegacyFormatError, LegacyImportError
from mettaformat.legacy.limits import DEFAULT_LIMITS, LegacyLimits
from mettaformat.legacy.modules import EXTRA_STATE_NOTE, is_module, module_attrs, module_dict, recover_module
from mettaformat.legacy.numpy_compat import is_numpy_scalar, numpy_scalar_value

__all__ = ["LoadedPickle", "graph_tensors", "to_checkpoint"]

_RECORD_ERAS: Final = {
    "agent.policy_store": "A0/A1",
    "metta.agent.policy_store": "A2",
    "metta.agent.policy_record": "C/D",
}
_METADATA_KEYS: Final = ("_metadata", "metadata", "checkpoint", "meta_data", "_meta_data", "_checkpoint")
_POLICY_KEYS: Final = ("_cached_policy", "_policy", "policy_cache")
_BRAIN_CLASSES: Final = frozenset({"MettaAgent", "BrainPolicy", "DistributedMettaAgent"})
_OPTIMIZER_KEYS: Final = ("optimizer_state_dict", "optimizer", "optimizer_state")
_MAX_METADATA_DEPTH: Final = 64


@dataclass
class LoadedPickle:
    """The interpreted top object of a legacy file and where it came from.

    Attributes:
        value: the top object.
        globals_seen: every ``(module, name)`` the pickle named.
        source_format: ``"torch-zip"`` or ``"torch-legacy-stream"``.
        provenance: container facts to carry into ``Checkpoint.provenance``.
    """

    value: Any
    globals_seen: set[tuple[str, str]]
    source_format: str
    provenance: dict[str, Any] = field(default_factory=dict)


def to_checkpoint(loaded: LoadedPickle, *, limits: LegacyLimits = DEFAULT_LIMITS) -> Checkpoint:
    """Recognise the shape of a legacy top object and build the hub :class:`Checkpoint`.

    Args:
        loaded: the interpreted file.
        limits: ``max_traversal`` bounds module-graph walks.

    Returns:
        The checkpoint; ``provenance["shape"]`` names what was recognised and
        ``legacy_graph`` is the top object.

    Raises:
        LegacyImportError: the object matches no known shape.
        LegacyFormatError: a recognised shape with malformed content (non-tensor state dicts).
        LegacyLimitError: a module graph above ``limits.max_traversal`` nodes.
    """
    v = loaded.value
    ckpt = Checkpoint(legacy_graph=v)
    ckpt.provenance = {
        "source_format": loaded.source_format,
        "class_paths": sorted(f"{m}.{n}" for m, n in loaded.globals_seen),
        **loaded.provenance,
    }
    if isinstance(v, LegacyObject) and v.name == "PolicyRecord" and module_attrs(v) is not None:
        _policy_record(ckpt, v, limits)
    elif isinstance(v, dict) and "checkpoint_format_version" in v and ("model_state_dict" in v or "model" in v):
        _v2(ckpt, v, limits)
    elif isinstance(v, dict) and any(k in v for k in _OPTIMIZER_KEYS) and ("epoch" in v or "agent_step" in v):
        _trainer_state(ckpt, v)
    elif isinstance(v, dict) and is_module(v.get("model")):
        _v2(ckpt, v, limits)
    elif isinstance(v, dict) and ("model_state_dict" in v or "state_dict" in v):
        _legacy_dict(ckpt, v)
    elif isinstance(v, dict) and v and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()):
        ckpt.tensors = dict(v)
        ckpt.provenance["shape"] = "state-dict"
    elif is_module(v):
        _set_model(ckpt, v, limits)
        ckpt.provenance["shape"] = "module"
    else:
        raise LegacyImportError(f"no known Metta checkpoint shape in a top-level {_describe(v)}", region="data.pkl")
    return ckpt


def graph_tensors(graph: Any, *, limits: LegacyLimits = DEFAULT_LIMITS) -> dict[str, torch.Tensor]:
    """The graph-only tensors of a legacy object graph, named exactly as :func:`to_checkpoint` names them.

    A container stores a legacy graph as an object tree; reading it back recognises the graph
    again, so ``legacy_tensors`` keep one naming across import, conversion and export.

    Args:
        graph: a ``legacy_graph`` (from the importer or decoded from a container).
        limits: ``max_traversal`` bounds the walk.

    Returns:
        Dotted attribute path -> tensor; empty for graphs with no recognisable module.
    """
    try:
        ckpt = to_checkpoint(LoadedPickle(graph, set(), "mettaformat"), limits=limits)
    except LegacyImportError:
        return {}
    return dict(ckpt.legacy_tensors)


def _describe(v: Any) -> str:
    return v.class_path if isinstance(v, LegacyObject) else type(v).__name__


def _set_model(ckpt: Checkpoint, model: Any, limits: LegacyLimits) -> None:
    state = recover_module(model, limits=limits)
    ckpt.tensors = state.state_dict
    ckpt.legacy_tensors = state.legacy_tensors
    ckpt.provenance["model_class"] = model.class_path
    ckpt.provenance["notes"] = [*state.notes, EXTRA_STATE_NOTE]
    agent = module_attrs(model) or {}
    inner = module_attrs(module_dict(agent, "_modules").get("policy")) or {}
    attributes = agent.get("agent_attributes", inner.get("agent_attributes"))
    if isinstance(attributes, dict):
        ckpt.agent_attributes = dict(attributes)
    names = agent.get("action_names", agent.get("_action_names", inner.get("action_names")))
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        ckpt.provenance["action_names"] = list(names)
    if model.name in _BRAIN_CLASSES:
        ckpt.model_type = "brain"
    elif model.name == "PytorchAgent":
        ckpt.model_type = "pytorch"


def _policy_record(ckpt: Checkpoint, record: LegacyObject, limits: LegacyLimits) -> None:
    attrs = module_attrs(record) or {}
    era = _RECORD_ERAS.get(record.module, "unknown")
    if era == "C/D":
        era = "D" if "run_name" in attrs else "C"
    name = attrs.get("run_name", attrs.get("name"))
    ckpt.name = name if isinstance(name, str) else None
    uri = attrs.get("uri")
    ckpt.uri = uri if isinstance(uri, str) else None
    metadata = next((attrs[k] for k in _METADATA_KEYS if attrs.get(k) is not None), None)
    ckpt.metadata = plain_metadata(metadata)
    ckpt.versions = {"checkpoint_format": 1}
    policy = next((attrs[k] for k in _POLICY_KEYS if attrs.get(k) is not None), None)
    ckpt.provenance["shape"] = "v1-policy-record"
    ckpt.provenance["record_class"] = record.class_path
    if is_module(policy):
        _set_model(ckpt, policy, limits)
        if era == "D" and "policy" in module_dict(module_attrs(policy) or {}, "_modules"):
            era = "D (policy submodule)"
        elif era == "A0/A1":
            era = "A1" if isinstance(policy, LegacyObject) and policy.name == "MettaAgent" else "A0"
    elif policy is not None:
        ckpt.provenance["notes"] = [f"policy is a {_describe(policy)}, not a module; no tensors recovered"]
    ckpt.provenance["era"] = era


def _version(d: dict[Any, Any], key: str) -> int | str | None:
    # Versions are compared and stored downstream: only ints (numpy ints too) and strings pass.
    value = d.get(key)
    if is_numpy_scalar(value):
        value = numpy_scalar_value(value)
    if value is None or type(value) in (int, str):
        return value
    raise LegacyFormatError(f"{key} must be an int or a string, got a {_describe(value)}", region="data.pkl")


def _v2(ckpt: Checkpoint, d: dict[Any, Any], limits: LegacyLimits) -> None:
    ckpt.versions = {"checkpoint_format": _version(d, "checkpoint_format_version")}
    for key, tag in (
        ("observation_space_version", "observation_space"),
        ("action_space_version", "action_space"),
        ("layer_version", "layer"),
    ):
        version = _version(d, key)
        if version is not None:
            ckpt.versions[tag] = version
    ckpt.name = d.get("name") if isinstance(d.get("name"), str) else None
    ckpt.uri = d.get("uri") if isinstance(d.get("uri"), str) else None
    ckpt.metadata = plain_metadata(d.get("metadata"))
    if "model_state_dict" in d:
        ckpt.tensors = _tensor_dict(d["model_state_dict"], "model_state_dict")
        ckpt.provenance["shape"] = "v2-state-dict"
    else:
        model = d.get("model")
        if is_module(model):
            _set_model(ckpt, model, limits)
        elif model is not None:
            raise LegacyFormatError(f"v2 'model' is a {_describe(model)}, not a module", region="data.pkl")
        ckpt.provenance["shape"] = "v2-full-model"
    model_type = d.get("model_type")
    if isinstance(model_type, str):
        ckpt.model_type = model_type
    if isinstance(d.get("agent_attributes"), dict):
        ckpt.agent_attributes = dict(d["agent_attributes"])
    for key in ("component_config", "migration_info"):
        if key in d:
            ckpt.provenance[key] = d[key]


def _trainer_state(ckpt: Checkpoint, d: dict[Any, Any]) -> None:
    key = next(k for k in _OPTIMIZER_KEYS if k in d)
    optimizer = d[key]
    rest = {k: v for k, v in d.items() if k != key}
    ckpt.training = TrainingState(optimizer=optimizer if isinstance(optimizer, dict) else None, trainer_state=rest)
    ckpt.provenance["shape"] = "trainer-state"
    ckpt.provenance["optimizer_key"] = key


def _legacy_dict(ckpt: Checkpoint, d: dict[Any, Any]) -> None:
    key = "model_state_dict" if "model_state_dict" in d else "state_dict"
    ckpt.tensors = _tensor_dict(d[key], key)
    ckpt.metadata = {k: d[k] for k in ("action_names", "agent_step", "epoch", "generation", "train_time") if k in d}
    ckpt.provenance["shape"] = "legacy-dict"


def _tensor_dict(value: Any, what: str) -> dict[str, torch.Tensor]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in value.items()
    ):
        raise LegacyFormatError(f"{what} is not a mapping of names to tensors", region="data.pkl")
    return dict(value)


def plain_metadata(value: Any) -> dict[str, Any]:
    """Metadata as a plain dict: PolicyMetadata's items, numpy scalars as Python numbers."""
    if isinstance(value, LegacyObject):
        merged = dict(value.state) if isinstance(value.state, dict) else {}
        merged.update(value.items)
        value = merged
    if not isinstance(value, dict):
        return {}
    plain = _plain(value, 0)
    return plain if isinstance(plain, dict) else {}


def _plain(value: Any, depth: int) -> Any:
    if depth > _MAX_METADATA_DEPTH:
        return value
    if is_numpy_scalar(value):
        try:
            return numpy_scalar_value(value)
        except LegacyImportError:
            return value
    if type(value) is dict:
        return {k: _plain(v, depth + 1) for k, v in value.items()}
    if type(value) is list:
        return [_plain(v, depth + 1) for v in value]
    return value
