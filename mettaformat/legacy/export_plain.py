"""What plain-data targets can hold: weights_only-safe trees, safetensors payloads, dropped fields.

Helpers of :mod:`mettaformat.legacy.export`: each takes the lists of an ``ExportReport`` and
appends what it leaves out (``not_carried``) or carries in a non-obvious way (``notes``).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping, Set
from typing import Any, Final

import torch

from mettaformat._torch import contiguous_cpu, storage_key
from mettaformat.checkpoint import Checkpoint
from mettaformat.container.tree import LegacyObject
from mettaformat.errors import WriteError
from mettaformat.legacy.allowlist import RecordedDefaultDict
from mettaformat.legacy.describe import describe
from mettaformat.legacy.pickler import class_pairs

__all__ = ["ALIASES_KEY", "dropped_fields", "safetensors_payload", "weights_only_tree"]

#: safetensors metadata key listing tied tensors (``{alias: stored name}``), read by ``load_any``.
ALIASES_KEY: Final = "mettaformat.aliases"
#: Scalars ``torch.load(weights_only=True)`` accepts (``torch._weights_only_unpickler``).
_SAFE_SCALARS: Final = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device)


class _Dropped:
    """Marker for a value left out of a weights_only tree."""


_DROP: Final = _Dropped()


def weights_only_tree(
    value: Any, path: str, not_carried: list[str], notes: list[str], allow_objects: bool = False
) -> Any:
    """A copy of ``value`` that ``torch.load(weights_only=True)`` can read.

    Recorded objects (``LegacyObject``: gym spaces, omegaconf nodes...) and other classes are
    left out, each reported at its path. A list or tuple holding one is left out whole, since
    dropping an element would shift the others. ``defaultdict`` becomes a plain ``dict``.

    Args:
        value: a metadata-like tree.
        path: its name in reports (``metadata``).
        not_carried: receives what is left out.
        notes: receives type changes.
        allow_objects: return ``value`` unchanged (the caller pickles objects as they are).

    Returns:
        The filtered tree (an empty dict if ``value`` itself is not weights_only-safe).
    """
    if allow_objects:
        return value
    try:
        out = _filter(value, path, not_carried, notes)
    except RecursionError as e:
        raise WriteError(f"{path}: nested too deeply to write") from e
    return {} if out is _DROP else out


def _filter(v: Any, path: str, not_carried: list[str], notes: list[str]) -> Any:
    if isinstance(v, _SAFE_SCALARS) or isinstance(v, torch.Size):
        return v
    if isinstance(v, torch.Tensor):
        if v.layout == torch.strided and not (v.is_quantized or v.is_meta or v.is_nested):
            return v
        not_carried.append(f"{path}: a {v.layout} tensor")
        return _DROP
    if isinstance(v, dict):
        if isinstance(v, RecordedDefaultDict):
            notes.append(f"{path}: a collections.defaultdict, written as a dict")
        out: dict[Any, Any] = OrderedDict() if isinstance(v, OrderedDict) else {}
        for k, x in v.items():
            key = _filter(k, f"{path}[{describe(k)}]", not_carried, notes)
            item = _filter(x, f"{path}.{k}", not_carried, notes) if key is not _DROP else _DROP
            if item is not _DROP:
                out[key] = item
        return out
    if isinstance(v, (list, tuple, set)):
        probe: list[str] = []
        items = [_filter(x, f"{path}[{i}]", probe, notes) for i, x in enumerate(v)]
        if probe:
            not_carried.append(f"{path}: left out whole, because {probe[0]}")
            return _DROP
        return items if isinstance(v, list) else (tuple(items) if isinstance(v, tuple) else set(items))
    what = v.class_path if isinstance(v, LegacyObject) else f"{type(v).__module__}.{type(v).__qualname__}"
    not_carried.append(f"{path}: a {what} object (weights_only files hold plain data only)")
    return _DROP


def dropped_fields(ckpt: Checkpoint, *, keep: Set[str]) -> list[str]:
    """What of ``ckpt`` a target keeping only the fields in ``keep`` leaves out.

    Args:
        ckpt: the checkpoint.
        keep: fields the target carries, among ``tensors, name, uri, model_type, metadata,
            agent_attributes, graph`` (a pickled object graph also carries model_type:
            it is the class).

    Returns:
        One line per field left out (empty fields are not listed).
    """
    out: list[str] = []
    if "metadata" not in keep and ckpt.metadata:
        keys = ", ".join(map(str, list(ckpt.metadata)[:8])) + (" ..." if len(ckpt.metadata) > 8 else "")
        out.append(f"metadata ({len(ckpt.metadata)} keys: {keys})")
    for name in ("name", "uri", "model_type"):
        value = getattr(ckpt, name)
        if name not in keep and value is not None:
            out.append(f"{name} ({value!r})")
    if "agent_attributes" not in keep and ckpt.agent_attributes:
        out.append(f"agent_attributes ({', '.join(map(str, ckpt.agent_attributes))})")
    for k, v in ckpt.versions.items():
        if k != "checkpoint_format" and v is not None:
            out.append(f"versions.{k} ({v!r})")
    t = ckpt.training
    if t is not None and (t.optimizer or t.scheduler or t.trainer_state or t.rng):
        parts = [n for n in ("optimizer", "scheduler", "trainer_state", "rng") if getattr(t, n)]
        out.append(f"training state ({', '.join(parts)})")
    # A graph of plain data (a v2 dict's) holds nothing beyond the fields above.
    graph = ckpt.legacy_graph
    if "graph" not in keep and graph is not None and (class_pairs(graph) or ckpt.legacy_tensors):
        out.append(
            f"legacy object graph (class paths, attributes and {len(ckpt.legacy_tensors)} graph-only tensors)"
        )
    elif ckpt.legacy_graph is None and ckpt.legacy_tensors:
        out.append(f"legacy tensors ({len(ckpt.legacy_tensors)}) without their object graph")
    if "migration_info" in ckpt.provenance:
        out.append("migration_info (from Metta's migrate tool)")
    return out


def safetensors_payload(
    ckpt: Checkpoint, not_carried: list[str], notes: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and str->str metadata for ``safetensors.torch.save_file``.

    Args:
        ckpt: the checkpoint.
        not_carried: receives ties that become copies and metadata left out or approximated.
        notes: receives aliases and JSON-encoded keys.

    Returns:
        ``(tensors, metadata)``; ``tensors`` share no storage with each other.

    Raises:
        WriteError: a tensor that is not dense (sparse, quantized, meta).
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[Any, str] = {}
    by_storage: dict[int, str] = {}
    for name, t in ckpt.tensors.items():
        key = storage_key(t)
        if key is not None and key in by_view:
            aliases[name] = by_view[key]
            continue
        c = contiguous_cpu(t, name)
        ptr = c.untyped_storage().data_ptr() if c.numel() else 0
        if ptr and ptr in by_storage:
            # save_file refuses overlapping tensors; only exact views can be aliases.
            not_carried.append(f"storage sharing of {name!r} with {by_storage[ptr]!r} (written as a copy)")
            c = c.clone()
            ptr = c.untyped_storage().data_ptr()
        if key is not None:
            by_view[key] = name
        if ptr:
            by_storage[ptr] = name
        tensors[name] = c
    names = list(ckpt.tensors)
    if names != sorted(names):
        notes.append("safetensors lists tensors sorted by name; the state dict's order is not kept")
    metadata = {"format": "pt"}
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(aliases)
        notes.append(f"{len(aliases)} tied tensor(s) stored once; {ALIASES_KEY!r} names them (load_any re-ties them)")
    add_safetensors_metadata(metadata, ckpt.metadata, not_carried, notes)
    return tensors, metadata


def add_safetensors_metadata(
    out: dict[str, str], metadata: Mapping[Any, Any], not_carried: list[str], notes: list[str]
) -> None:
    """Add user ``metadata`` to a safetensors ``__metadata__`` map (str to str), the one way.

    Strings are kept, other exact-JSON values are JSON-encoded (noted), and the rest (and keys
    already in ``out``) are listed in ``not_carried``.
    """
    encoded: list[str] = []
    for k, v in metadata.items():
        if not isinstance(k, str) or k in out:
            not_carried.append(f"metadata[{k!r}]: non-string or reserved key")
        elif isinstance(v, str):
            out[k] = v
        elif _json_exact(v):
            out[k] = json.dumps(v)
            encoded.append(k)
        else:
            not_carried.append(f"metadata[{k!r}]: {type(v).__name__} has no exact JSON form")
    if encoded:
        notes.append(f"metadata {encoded} JSON-encoded (safetensors metadata is str to str; read back as strings)")


def _json_exact(v: Any, depth: int = 0) -> bool:
    """True if ``json.loads(json.dumps(v)) == v`` with the same types (no tuples, int keys, NaN)."""
    if depth > 64:
        return False
    if v is None or isinstance(v, (bool, int, str)):
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    if type(v) is list:
        return all(_json_exact(x, depth + 1) for x in v)
    if type(v) is dict:
        return all(isinstance(k, str) and _json_exact(x, depth + 1) for k, x in v.items())
    return False
