"""Sharded training checkpoints for :class:`~mettaformat.MettaAgent` (``distributed=True``).

Every rank calls save and load. The model and optimizer go through DCP's
``get_state_dict``/``set_state_dict`` (FSDP2, DTensor or plain modules), so a job saved on N
ranks resumes on M. Counters, the scheduler, the agent's own fields and every rank's RNG states
are non-tensor items; the RNG states of all ranks are gathered to the coordinator, which is the
rank that writes non-tensor items, and each rank restores its own on load when the world size
is unchanged.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import save

from mettaformat.checkpoint import TrainingState
from mettaformat.constants import Compression
from mettaformat.dcp.consolidate import read_objects
from mettaformat.dcp.reader import MettaStorageReader
from mettaformat.dcp.writer import MettaStorageWriter
from mettaformat.training import capture_rng, restore_rng

if TYPE_CHECKING:
    from mettaformat.agent import MettaAgent

__all__ = ["load_sharded_training", "save_sharded_training"]

#: Items stored whole, as 1-tuples (see save_sharded_training).
_WHOLE = ("agent", "trainer_state", "rng")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_rng() -> dict[str, Any]:
    world = _world()[1]
    mine = capture_rng()
    if world == 1:
        return {"rank0": mine}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)  # in-memory exchange between the job's own ranks
    return {f"rank{r}": s for r, s in enumerate(gathered)}


def save_sharded_training(
    agent: MettaAgent,
    path: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    trainer_state: dict[str, Any] | None,
    *,
    compression: Compression = "raw",
    durable: bool = False,
) -> None:
    """Collective: every rank writes its shards of ``path`` (a directory); see the module doc."""
    from mettaformat.agent import unwrap_model

    model = unwrap_model(agent.model)
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    own = agent.to_checkpoint()
    fields = {
        "model_type": own.model_type, "name": own.name, "uri": own.uri, "metadata": own.metadata,
        "agent_attributes": own.agent_attributes, "versions": own.versions, "config": agent.config,
    }
    # DCP splits nested dicts into one item per leaf and turns their keys into strings; a 1-tuple
    # is a leaf, so these trees are stored whole and come back exactly (int keys included).
    state: dict[str, Any] = {
        "model": model_sd,
        "agent": (fields,),
        "trainer_state": (dict(trainer_state or {}),),
        "rng": (_all_rng(),),
    }
    if optimizer is not None:
        state["optimizer"] = optim_sd
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one process without a process group is fine
        save(state, storage_writer=MettaStorageWriter(path, compression=compression, durable=durable),
                 no_dist=_world()[1] == 1)


def _whole_items(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The items stored whole by :func:`save_sharded_training`, unwrapped from their 1-tuples."""
    values, _ = read_objects(path)
    return {k: v[0] for k, v in values.items() if k in _WHOLE and isinstance(v, tuple) and len(v) == 1}


def load_sharded_training(
    agent_cls: type[MettaAgent],
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    *,
    restore_rng_state: bool = True,
) -> MettaAgent:
    """Collective: fill ``model`` (sharded or not) and ``optimizer`` from ``path``; see the module doc."""
    from mettaformat.agent import unwrap_model

    inner = unwrap_model(model)
    model_sd, optim_sd = get_state_dict(inner, optimizer if optimizer is not None else [])
    target: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        target["optimizer"] = optim_sd
    if scheduler is not None:
        target["scheduler"] = scheduler.state_dict()
    rank, world = _world()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one process without a process group is fine
        load(target, storage_reader=MettaStorageReader(path), no_dist=world == 1)
    set_state_dict(inner, optimizer if optimizer is not None else [], model_state_dict=target["model"],
                   optim_state_dict=target.get("optimizer", {}))
    if scheduler is not None:
        scheduler.load_state_dict(target["scheduler"])
    objects = _whole_items(path)
    own = objects.get("agent", {})
    agent = agent_cls(model, model_type=own.get("model_type") or "brain", name=own.get("name"), uri=own.get("uri"),
                      metadata=own.get("metadata"), agent_attributes=own.get("agent_attributes"),
                      config=own.get("config"))
    rngs = objects.get("rng", {})
    training = TrainingState(trainer_state=dict(objects.get("trainer_state", {})), rng=rngs.get(f"rank{rank}", {}))
    if restore_rng_state:
        if len(rngs) != world:
            agent.provenance["rng_not_restored"] = [f"saved on {len(rngs)} ranks, resumed on {world}"]
        elif training.rng:
            missing = restore_rng(training.rng)
            if missing:
                agent.provenance["rng_not_restored"] = missing
    agent.training_state = training
    return agent
