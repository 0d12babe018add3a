"""Importer-only values made storable, and structural equality of legacy object graphs.

The importer hands out a few in-memory stand-ins that an object tree (``encode_tree``) cannot
store: :class:`~mettaformat.legacy.allowlist.RecordedDefaultDict` for ``collections.defaultdict``,
:class:`~mettaformat.legacy.allowlist.Builtin` for allowlisted globals (a defaultdict's
``dict`` factory), :class:`~mettaformat.legacy.tensors.StorageType` for storage classes used as
values, :class:`~mettaformat.legacy.tensors.StorageRef` for bare storages, and ``complex``.
:func:`to_storable` rewrites each as the ``LegacyObject`` that the pickle itself spelled
(``GLOBAL collections.defaultdict`` + ``REDUCE (factory,)`` + ``SETITEMS``...), so the container
format needs no new tag and the v1 exporter writes them back exactly as they were read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Final

import torch

from mettaformat.checkpoint import Checkpoint, TrainingState
from mettaformat.container.tree import LegacyObject
from mettaformat.legacy.allowlist import Builtin, RecordedDefaultDict
from mettaformat.legacy.tensors import STORAGE_CLASS_DTYPES, StorageRef, StorageType

__all__ = ["graph_equal", "storable_checkpoint", "to_storable"]

_STORAGE_NAMES: Final = {dtype: name for name, dtype in STORAGE_CLASS_DTYPES.items()}
_SCALARS: Final = frozenset({type(None), bool, int, float, str, bytes, bytearray, torch.dtype, torch.device})


def to_storable(value: Any) -> Any:
    """Return ``value`` with every importer-only stand-in replaced by its ``LegacyObject`` spelling.

    Containers are copied (the input is never modified); sharing and cycles through
    ``LegacyObject`` nodes, dicts and lists are preserved; tensors are kept as they are.

    Args:
        value: a legacy object graph, metadata tree or any tree ``encode_tree`` accepts.

    Returns:
        An equivalent value that ``encode_tree`` can store.

    Raises:
        RecursionError: only for graphs deeper than the interpreter allows (callers turn it
            into a ``WriteError``).
    """
    return _Storable().convert(value)


def storable_checkpoint(ckpt: Checkpoint) -> Checkpoint:
    """A shallow copy of ``ckpt`` whose trees (graph, metadata, attributes, provenance, training) are storable.

    Call this on any checkpoint that may come from the legacy importer before
    ``checkpoint_io.write_checkpoint``.

    Args:
        ckpt: the checkpoint; not modified.

    Returns:
        A checkpoint sharing ``ckpt``'s tensors, with converted copies of its trees.
    """
    s = _Storable()
    training = ckpt.training
    if training is not None:
        training = TrainingState(
            optimizer=s.convert(training.optimizer),
            scheduler=s.convert(training.scheduler),
            trainer_state=s.convert(training.trainer_state),
            rng=s.convert(training.rng),
        )
    return dataclasses.replace(
        ckpt,
        metadata=s.convert(ckpt.metadata),
        agent_attributes=s.convert(ckpt.agent_attributes),
        versions=s.convert(ckpt.versions),
        provenance=s.convert(ckpt.provenance),
        training=training,
        legacy_graph=s.convert(ckpt.legacy_graph),
    )


class _Storable:
    def __init__(self) -> None:
        # id -> converted copy; the originals stay alive in the input, so ids are stable.
        self.memo: dict[int, Any] = {}

    def convert(self, v: Any) -> Any:
        cls = type(v)
        if cls in _SCALARS or isinstance(v, (torch.Tensor, torch.Size)):
            return v
        done = self.memo.get(id(v))
        if done is not None:
            return done
        if isinstance(v, complex):
            # Protocol 2 pickles a complex as REDUCE builtins.complex (real, imag).
            return LegacyObject("builtins", "complex", args=(v.real, v.imag), kind="reduce")
        if isinstance(v, RecordedDefaultDict):
            out = self.memo[id(v)] = LegacyObject("collections", "defaultdict", kind="reduce")
            out.args = () if v.default_factory is None else (self.convert(v.default_factory),)
            out.items = [(self.convert(k), self.convert(x)) for k, x in v.items()]
            return out
        if isinstance(v, LegacyObject):
            obj = self.memo[id(v)] = LegacyObject(v.module, v.name, kind=v.kind)
            obj.args = tuple(self.convert(a) for a in v.args)
            obj.state = self.convert(v.state)
            obj.items = [(self.convert(k), self.convert(x)) for k, x in v.items]
            obj.listitems = [self.convert(x) for x in v.listitems]
            return obj
        if isinstance(v, (Builtin, StorageType)):
            module, _, name = v.class_path.rpartition(".")
            ref = self.memo[id(v)] = LegacyObject(module, name, kind="global")
            return ref
        if isinstance(v, StorageRef):
            name = "UntypedStorage" if v.untyped else _STORAGE_NAMES[v.dtype]
            ref = self.memo[id(v)] = LegacyObject("torch", name, args=(v.tensor,), kind="reduce")
            return ref
        if isinstance(v, dict):
            d: dict[Any, Any] = {}
            self.memo[id(v)] = d
            for k, x in v.items():
                d[self.convert(k)] = self.convert(x)
            return d
        if isinstance(v, list):
            items: list[Any] = []
            self.memo[id(v)] = items
            items.extend(self.convert(x) for x in v)
            return items
        if isinstance(v, tuple):
            return tuple(self.convert(x) for x in v)
        if isinstance(v, (set, frozenset)):
            return type(v)(self.convert(x) for x in v)
        return v  # anything else is left for encode_tree to accept or refuse, naming its path


def graph_equal(a: Any, b: Any) -> bool:
    """Structural equality of two object graphs, as the importer and the container represent them.

    Both sides are normalised with :func:`to_storable` first, so a graph straight from the
    importer equals the same graph read back from a container. Types must match exactly
    (``1`` differs from ``1.0`` and ``True``); tensors must have the same dtype, shape and
    bytes; floats compare NaN-equal; cycles and shared nodes are followed once.

    Args:
        a: a graph (``LegacyObject`` nodes, containers, tensors, scalars).
        b: another.

    Returns:
        True if they are equal; False also for graphs too deep to compare (callers then write
        the value they were given, and the writer reports the depth).
    """
    try:
        return _Equal().eq(to_storable(a), to_storable(b))
    except RecursionError:
        return False


class _Equal:
    def __init__(self) -> None:
        self.pairs: set[tuple[int, int]] = set()

    def eq(self, a: Any, b: Any) -> bool:
        if type(a) is not type(b):
            return False
        if isinstance(a, torch.Tensor):
            return a.dtype == b.dtype and a.shape == b.shape and _same_bytes(a, b)
        if isinstance(a, float):
            return a == b or (math.isnan(a) and math.isnan(b))
        if isinstance(a, (LegacyObject, dict, list)):
            pair = (id(a), id(b))
            if pair in self.pairs:
                return True
            self.pairs.add(pair)
        if isinstance(a, LegacyObject):
            return (
                (a.module, a.name, a.kind) == (b.module, b.name, b.kind)
                and self.eq(a.args, b.args)
                and self.eq(a.state, b.state)
                and self.eq(a.items, b.items)
                and self.eq(a.listitems, b.listitems)
            )
        if isinstance(a, dict):
            return len(a) == len(b) and all(
                self.eq(ka, kb) and self.eq(va, vb) for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
            )
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(self.eq(x, y) for x, y in zip(a, b, strict=True))
        return bool(a == b)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0:
        return True
    # Bytes, not values: NaN payloads and -0.0 must survive a round trip too.
    ab = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    bb = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return bool(torch.equal(ab, bb))
