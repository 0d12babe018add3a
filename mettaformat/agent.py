"""``MettaAgent``: the agent-level API of the Metta stack, on top of the container.

``agent.save(path)`` / ``MettaAgent.load(path)`` for policies, and
``agent.save_for_training(path, optimizer, ...)`` / ``MettaAgent.load_for_training(path, ...)``
for pickle-free training checkpoints that resume bit-exactly. Loading accepts every format
``load_any`` knows, and rebuilds the model through the registry (``register_model_type``);
it never hands back an agent without a model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mettaformat.anyformat import load_any
from mettaformat.checkpoint import Checkpoint, TrainingState
from mettaformat.checkpoint_io import write_checkpoint
from mettaformat.constants import MFMT_VERSION_MAJOR, ZSTD_DEFAULT_LEVEL, Compression
from mettaformat.container.reader import LazyCheckpoint
from mettaformat.errors import ModelReconstructionError, naming_file
from mettaformat.registry import get_model_builder, registered_model_types
from mettaformat.training import capture_training_state, restore_rng

__all__ = ["MettaAgent", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        elif isinstance(model, MettaAgent):
            model = model.model
        else:
            return model


def _is_writer_rank(all_ranks: bool) -> bool:
    if all_ranks or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return True
    return torch.distributed.get_rank() == 0


class MettaAgent(nn.Module):
    """A policy with what is needed to save, share and rebuild it.

    Args:
        model: the policy module (DDP and ``torch.compile`` wrappers are unwrapped on save).
        model_type: the registry name used to rebuild it (``"brain"``, ``"pytorch"``...).
        name: the policy's name (Metta's ``run_name``).
        uri: where it came from.
        metadata: epoch, agent_step, score, eval_scores, action_names...
        agent_attributes: what a builder needs; defaults to ``model.agent_attributes``.
        config: the model configuration passed to the builder.

    Example:
        >>> agent = MettaAgent(policy, model_type="mlp", metadata={"epoch": 10})
        >>> agent.save("model_0010.mfmt")
        >>> agent = MettaAgent.load("model_0010.mfmt", device="cpu")
    """

    def __init__(
        self,
        model: nn.Module,
        model_type: str = "brain",
        name: str | None = None,
        uri: str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        agent_attributes: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, not {type(model).__name__}")
        self.model = model
        self.model_type = model_type
        self.name = name
        self.uri = uri
        self.metadata: dict[str, Any] = dict(metadata or {})
        attrs = (
            agent_attributes if agent_attributes is not None else getattr(unwrap_model(model), "agent_attributes", None)
        )
        self.agent_attributes: dict[str, Any] = dict(attrs or {})
        self.config: dict[str, Any] = dict(config or {})
        self.checkpoint_format_version = MFMT_VERSION_MAJOR
        self.observation_space_version: str | None = None
        self.action_space_version: str | None = None
        self.layer_version: str | None = None
        self.provenance: dict[str, Any] = {}
        #: Set by :meth:`load_for_training`: optimizer, scheduler, counters and RNG states.
        self.training_state: TrainingState | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def trainer_state(self) -> dict[str, Any]:
        """Counters saved with a training checkpoint (``epoch``, ``agent_step``...)."""
        return self.training_state.trainer_state if self.training_state is not None else {}

    # -- saving ------------------------------------------------------------------------------
    def to_checkpoint(self, *, training: TrainingState | None = None) -> Checkpoint:
        model = unwrap_model(self.model)
        versions: dict[str, Any] = {"checkpoint_format": MFMT_VERSION_MAJOR}
        for key, value in (
            ("observation_space", self.observation_space_version),
            ("action_space", self.action_space_version),
            ("layer", self.layer_version),
        ):
            if value is not None:
                versions[key] = value
        provenance = {k: v for k, v in self.provenance.items() if k != "config"}
        provenance["config"] = self.config
        return Checkpoint(
            tensors=model.state_dict(),
            model_type=self.model_type,
            name=self.name,
            uri=self.uri,
            metadata=dict(self.metadata),
            agent_attributes=dict(self.agent_attributes),
            versions=versions,
            training=training,
            provenance=provenance,
        )

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        compression: Compression = "raw",
        level: int | str = ZSTD_DEFAULT_LEVEL,
        durable: bool = False,
        all_ranks: bool = False,
        base: str | os.PathLike[str] | LazyCheckpoint | None = None,
    ) -> Path | None:
        """Save weights, model type, config, metadata, versions and agent attributes (atomically).

        Under ``torch.distributed`` only rank 0 writes unless ``all_ranks``. ``base``: an earlier
        checkpoint of this model; tensors that changed little are stored as differences from it
        (see :func:`mettaformat.save_file`).

        Returns:
            The path written, or None on a rank that did not write.

        Raises:
            WriteError: a value that cannot be stored, or an I/O error (the old file is kept).
        """
        if not _is_writer_rank(all_ranks):
            return None
        write_checkpoint(self.to_checkpoint(), path, compression=compression, level=level, durable=durable, base=base)
        return Path(path)

    def save_for_training(
        self,
        path: str | os.PathLike[str],
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        trainer_state: dict[str, Any] | None = None,
        *,
        compression: Compression = "raw",
        level: int | str = ZSTD_DEFAULT_LEVEL,
        durable: bool = False,
        all_ranks: bool = False,
        distributed: bool = False,
        base: str | os.PathLike[str] | LazyCheckpoint | None = None,
    ) -> Path | None:
        """Save the model plus optimizer, scheduler, counters and RNG states; no pickle anywhere.

        ``trainer_state`` holds counters such as ``{"epoch": 3, "agent_step": 4096}``.
        ``distributed=True``: every rank calls this and writes its own shards (FSDP2/DTensor
        models) into the directory ``path`` through :mod:`mettaformat.dcp`; resume with
        ``load_for_training(path, model=..., distributed=True)`` on any number of ranks.
        ``base``: as for :meth:`save`; optimizer state is stored as differences too.

        Raises:
            WriteError: as for :meth:`save` (for example a scheduler holding a lambda).
        """
        if distributed:
            from mettaformat.dcp.training import save_sharded_training

            save_sharded_training(self, path, optimizer, scheduler, trainer_state, compression=compression,
                                  durable=durable)
            return Path(path)
        if not _is_writer_rank(all_ranks):
            return None
        training = capture_training_state(optimizer, scheduler, trainer_state)
        write_checkpoint(
            self.to_checkpoint(training=training), path, compression=compression, level=level, durable=durable,
            base=base,
        )
        return Path(path)

    def export_for_inference(self, path: str | os.PathLike[str], *, compression: Compression = "raw") -> Path:
        """A minimal checkpoint: weights, model type, config, agent attributes and action names."""
        minimal = self.to_checkpoint()
        minimal.metadata = {k: self.metadata[k] for k in ("action_names",) if k in self.metadata}
        minimal.provenance = {"config": self.config, "exported_for_inference": True}
        write_checkpoint(minimal, path, compression=compression)
        return Path(path)

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Checkpoint,
        *,
        model: nn.Module | None = None,
        device: str | torch.device = "cpu",
        strict: bool = True,
        lazy: bool = True,
    ) -> MettaAgent:
        """Rebuild an agent from a :class:`Checkpoint` (see :meth:`load`)."""
        config = dict(ckpt.provenance.get("config") or {})
        built = model is None  # nobody else holds its parameters (an optimizer, say)
        if model is None:
            model = _build(ckpt, config)
        model = unwrap_model(model)
        target = torch.device(device)
        # assign=True keeps zero-copy mapped weights as the parameters themselves (lazy load), and
        # weights already loaded onto the target device (views of one allocation) in place.
        on_target = built and target.type != "cpu" and all(
            t.device.type == target.type and target.index in (None, t.device.index) for t in ckpt.tensors.values()
        )
        assign = (lazy and target.type == "cpu") or on_target
        try:
            result = model.load_state_dict(dict(ckpt.tensors), strict=strict, assign=assign)
        except RuntimeError as e:
            raise ModelReconstructionError(
                f"checkpoint {ckpt.uri or ckpt.name!r} does not fit the {type(model).__name__} built for model type "
                f"{ckpt.model_type!r}: {e}"
            ) from e
        model.to(target)
        agent = cls(
            model,
            model_type=ckpt.model_type or "pytorch",
            name=ckpt.name,
            uri=ckpt.uri,
            metadata=ckpt.metadata,
            agent_attributes=ckpt.agent_attributes,
            config=config,
        )
        agent.observation_space_version = ckpt.versions.get("observation_space")
        agent.action_space_version = ckpt.versions.get("action_space")
        agent.layer_version = ckpt.versions.get("layer")
        agent.checkpoint_format_version = ckpt.versions.get("checkpoint_format") or MFMT_VERSION_MAJOR
        agent.provenance = {k: v for k, v in ckpt.provenance.items() if k != "config"}
        if not strict:
            agent.provenance["load_mismatch"] = {
                "missing": list(result.missing_keys),
                "unexpected": list(result.unexpected_keys),
            }
        return agent

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        *,
        model: nn.Module | None = None,
        strict: bool = True,
        lazy: bool = True,
        migrate: bool = True,
    ) -> MettaAgent:
        """Load a policy from any format ``load_any`` knows.

        Args:
            device: where the model ends up.
            model: a module to load the weights into, instead of building one from the registry.
            strict: require the state dict keys to match exactly.
            lazy: CPU weights stay zero-copy views of the file (raw containers).
            migrate: apply schema migrations (see :mod:`mettaformat.migrations`).

        Raises:
            ModelReconstructionError: no builder is registered for the model type, or the
                weights do not fit the built model.
            FormatError, LegacyImportError, IntegrityError: the file cannot be read.
        """
        with naming_file(path):
            ckpt = load_any(path, migrate=migrate, lazy=lazy, device=device)
            return cls.from_checkpoint(ckpt, model=model, device=device, strict=strict, lazy=lazy)

    @classmethod
    def load_for_training(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        *,
        restore_rng_state: bool = True,
        distributed: bool = False,
    ) -> MettaAgent:
        """Load a training checkpoint, ready to resume immediately.

        ``distributed=True``: a directory written by ``save_for_training(..., distributed=True)``;
        every rank calls this with its (sharded) ``model``, which is required.

        The model is rebuilt (or ``model`` is filled), then ``optimizer`` and ``scheduler`` get
        their saved state and the RNGs are restored. Counters are in ``agent.trainer_state``.
        Weights are copied into memory (not mapped), since training writes them.

        Raises:
            ModelReconstructionError: as for :meth:`load`.
            FormatError, LegacyImportError, IntegrityError: the file cannot be read.

        A checkpoint without training state (a plain policy) loads with an empty
        ``training_state``: the optimizer, scheduler and RNGs are left as they are.

        An optimizer drives the parameters it was built over, so ``optimizer=`` needs the model
        those parameters belong to as ``model=`` (build the model, then the optimizer over
        ``model.parameters()``, then call this); otherwise a ``ValueError`` says so.
        """
        if distributed:
            if model is None:
                raise ModelReconstructionError("load_for_training(distributed=True) needs the (sharded) model")
            from mettaformat.dcp.training import load_sharded_training

            return load_sharded_training(cls, path, model, optimizer, scheduler, restore_rng_state=restore_rng_state)
        _check_optimizer_drives(optimizer, model)
        with naming_file(path):
            ckpt = load_any(path, lazy=False, device=device)
            agent = cls.from_checkpoint(ckpt, model=model, device=device, lazy=False)
            training = ckpt.training or TrainingState()
            # The trees are type-checked; whether they fit this optimizer is for torch to say.
            with _not_fitting("the saved optimizer state does not fit this optimizer"):
                if optimizer is not None and training.optimizer is not None:
                    optimizer.load_state_dict(training.optimizer)
            with _not_fitting("the saved scheduler state does not fit this scheduler"):
                if scheduler is not None and training.scheduler is not None:
                    scheduler.load_state_dict(training.scheduler)
            with _not_fitting("the saved RNG state cannot be restored"):
                if restore_rng_state and training.rng:
                    missing = restore_rng(training.rng)
                    if missing:
                        agent.provenance["rng_not_restored"] = missing
        agent.training_state = training
        return agent


@contextmanager
def _not_fitting(what: str) -> Iterator[None]:
    try:
        yield
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise ModelReconstructionError(f"{what}: {type(e).__name__}: {e}") from e


def _check_optimizer_drives(optimizer: torch.optim.Optimizer | None, model: nn.Module | None) -> None:
    """Refuse an optimizer that would not update the model load_for_training returns."""
    if optimizer is None:
        return
    how = (
        "build the model first, e.g. model = MettaAgent.load(path).model (or your constructor), then "
        "optimizer = torch.optim.Adam(model.parameters()), then "
        "MettaAgent.load_for_training(path, model=model, optimizer=optimizer)"
    )
    if model is None:
        raise ValueError(
            "load_for_training(optimizer=...) needs model=...: the model it would build is new, and your "
            f"optimizer holds other parameters, so training would not change it; {how}"
        )
    own = {id(p) for p in unwrap_model(model).parameters()}
    foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in own)
    if foreign:
        raise ValueError(
            f"the optimizer holds {foreign} parameters that are not the model's, so training would not change "
            f"the loaded model; {how}"
        )


def _build(ckpt: Checkpoint, config: dict[str, Any]) -> nn.Module:
    builder = get_model_builder(ckpt.model_type)
    if builder is None:
        known = ", ".join(registered_model_types()) or "none"
        raise ModelReconstructionError(
            f"cannot rebuild the model of {ckpt.uri or ckpt.name or 'this checkpoint'}: no builder is registered for "
            f"model type {ckpt.model_type!r} (registered: {known}). Register one with "
            f"mettaformat.register_model_type({ckpt.model_type or 'NAME'!r}, builder), where "
            "builder(agent_attributes, metadata, config) returns an nn.Module, or pass model=... to load into "
            "an existing module."
        )
    try:
        model = builder(dict(ckpt.agent_attributes), dict(ckpt.metadata), config)
    except Exception as e:
        raise ModelReconstructionError(f"builder for model type {ckpt.model_type!r} failed: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelReconstructionError(
            f"builder for model type {ckpt.model_type!r} returned {type(model).__name__}, not an nn.Module"
        )
    return model
