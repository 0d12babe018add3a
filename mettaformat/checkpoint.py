"""The hub: one in-memory model of a checkpoint that every reader produces and every writer takes.

Each on-disk format needs one reader into :class:`Checkpoint` and one writer out of it, instead
of one converter per pair of formats.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Checkpoint", "TrainingState"]


@dataclass
class TrainingState:
    """What a training run needs to resume bit-exactly, besides the model weights.

    Attributes:
        optimizer: ``optimizer.state_dict()`` (tensors stay tensors).
        scheduler: ``scheduler.state_dict()``, if any.
        trainer_state: counters and free-form trainer values (``epoch``, ``agent_step``...).
        rng: RNG states: ``torch`` (a uint8 tensor), ``cuda`` (a list of them), ``numpy`` and
            ``python`` (plain trees).
    """

    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    trainer_state: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """A checkpoint, whatever file it came from.

    Attributes:
        tensors: the model state dict, name to tensor (possibly lazy, memory-mapped views).
        model_type: how to rebuild the model (``"brain"``, ``"pytorch"`` or a registered name).
        name: the policy's name (Metta's ``run_name`` / ``name``).
        uri: where the policy came from (``file://...``).
        metadata: epoch, agent_step, score, eval_scores, action_names and any user keys.
        agent_attributes: what a model builder needs (spaces, sizes, feature normalisations).
        versions: ``checkpoint_format`` plus optional ``observation_space``, ``action_space``
            and ``layer`` version strings.
        training: optimizer, scheduler, counters and RNG, for training checkpoints.
        provenance: where the data came from: ``source_format``, ``shape`` (what was
            recognised), ``class_paths`` of the legacy object graph, ``migrations`` applied.
        legacy_graph: for legacy imports, the inert object graph (``LegacyObject`` nodes) that
            lets a v1 file be re-exported faithfully.
        legacy_tensors: tensors that only the legacy object graph holds (``initial_weights``...).
    """

    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    model_type: str | None = None
    name: str | None = None
    uri: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    agent_attributes: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    training: TrainingState | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    legacy_graph: Any = None
    legacy_tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __repr__(self) -> str:
        # Never the tensors themselves: a state dict can hold gigabytes.
        size = sum(t.numel() * t.element_size() for t in self.tensors.values())
        parts = [
            f"model_type={self.model_type!r}",
            f"name={self.name!r}",
            f"{len(self.tensors)} tensors ({size} bytes)",
            f"metadata keys={sorted(map(str, self.metadata))[:8]}{'...' if len(self.metadata) > 8 else ''}",
            f"versions={self.versions!r}",
            f"training={'yes' if self.training is not None else 'no'}",
        ]
        if self.legacy_tensors:
            parts.append(f"{len(self.legacy_tensors)} legacy tensors")
        return f"Checkpoint({', '.join(parts)})"
