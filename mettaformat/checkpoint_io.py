"""A :class:`Checkpoint` to and from the container.

Layout inside a container:

- section ``model``: the weights; ``legacy`` / ``optimizer`` / ``rng``: tensors of the trees below.
- metadata: the user metadata (``epoch``, ``agent_step``, ``score``...) at top level, so that
  header-only readers (PolicyStore selectors) find them, plus one reserved key,
  ``mettaformat.checkpoint``, holding ``model_type``, ``name``, ``uri``, ``config``,
  ``agent_attributes``, ``versions`` and ``provenance``.
- trees: ``optimizer``, ``scheduler``, ``trainer_state``, ``rng`` (training checkpoints) and
  ``legacy`` (the inert object graph of an imported legacy file).
"""

from __future__ import annotations

import os
from typing import Any, Final

import torch

from mettaformat.checkpoint import Checkpoint, TrainingState
from mettaformat.constants import MFMT_VERSION_MAJOR, ZSTD_DEFAULT_LEVEL, Compression
from mettaformat.container.device_load import off_host
from mettaformat.container.layout import Preamble
from mettaformat.container.opened import CHECKPOINT_KEY, split_metadata
from mettaformat.container.reader import LazyCheckpoint
from mettaformat.container.writer import write_container
from mettaformat.errors import WriteError
from mettaformat.fields import check_checkpoint, check_training

__all__ = ["CHECKPOINT_KEY", "checkpoint_fields", "read_checkpoint", "split_metadata", "write_checkpoint"]

_TRAINING_TREES: Final = ("optimizer", "scheduler", "trainer_state", "rng")


def write_checkpoint(
    ckpt: Checkpoint,
    path: str | os.PathLike[str],
    *,
    compression: Compression = "raw",
    level: int | str = ZSTD_DEFAULT_LEVEL,
    durable: bool = False,
    config: dict[str, Any] | None = None,
    base: str | os.PathLike[str] | LazyCheckpoint | None = None,
) -> None:
    """Write ``ckpt`` as a container at ``path`` (atomically); a delta of ``base`` when given (see
    :func:`mettaformat.save_file`).

    Raises:
        WriteError: metadata using the reserved key, values an object tree cannot hold, I/O errors.
    """
    from mettaformat.legacy.graph import storable_checkpoint  # local: legacy imports this module

    # Values the legacy importer keeps as markers (a defaultdict's factory, bare storages) become
    # the LegacyObject records the pickle itself spelled, so that every import can be written.
    ckpt = storable_checkpoint(ckpt)
    if CHECKPOINT_KEY in ckpt.metadata:
        raise WriteError(f"metadata key {CHECKPOINT_KEY!r} is reserved")
    versions = dict(ckpt.versions)
    versions["checkpoint_format"] = MFMT_VERSION_MAJOR
    own: dict[str, Any] = {
        "model_type": ckpt.model_type,
        "name": ckpt.name,
        "uri": ckpt.uri,
        "config": config if config is not None else ckpt.provenance.get("config"),
        "agent_attributes": ckpt.agent_attributes,
        "versions": versions,
        "provenance": {k: v for k, v in ckpt.provenance.items() if k != "config"},
    }
    metadata = {**ckpt.metadata, CHECKPOINT_KEY: own}
    trees: dict[str, Any] = {}
    if ckpt.training is not None:
        t = ckpt.training
        for name, value in (
            ("optimizer", t.optimizer),
            ("scheduler", t.scheduler),
            ("trainer_state", t.trainer_state),
            ("rng", t.rng),
        ):
            if value is not None:
                trees[name] = value
    sections: dict[str, Any] = {"model": ckpt.tensors}
    if ckpt.legacy_graph is not None:
        trees["legacy"] = ckpt.legacy_graph
    elif ckpt.legacy_tensors:
        sections["legacy"] = ckpt.legacy_tensors
    write_container(
        path, sections, metadata=metadata, trees=trees, compression=compression, level=level, durable=durable,
        base=base,
    )


def _or_empty(value: Any) -> Any:
    """An absent tree is an empty map; anything else is kept for the type checks to judge."""
    return {} if value is None else value


def checkpoint_fields(metadata: dict[str, Any], preamble: Preamble) -> Checkpoint:
    """A :class:`Checkpoint` without tensors from a container's decoded metadata (user metadata and
    the checkpoint's own fields, type-checked).

    Raises:
        HeaderError: a field of the wrong type.
    """
    user, own = split_metadata(metadata)
    ckpt = check_checkpoint(
        Checkpoint(
            model_type=own.get("model_type"),
            name=own.get("name"),
            uri=own.get("uri"),
            metadata=user,
            agent_attributes=_or_empty(own.get("agent_attributes")),
            versions=_or_empty(own.get("versions")),
            provenance=_or_empty(own.get("provenance")),
        )
    )
    if own.get("config") is not None:
        check_checkpoint(Checkpoint(provenance={"config": own["config"]}))
    ckpt.versions.setdefault("checkpoint_format", preamble.major)
    ckpt.provenance.setdefault("source_format", "mettaformat")
    ckpt.provenance["container_version"] = f"{preamble.major}.{preamble.minor}"
    if own.get("config") is not None:
        ckpt.provenance["config"] = own["config"]
    return ckpt


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    lazy: bool = True,
    verify: bool = True,
    with_tensors: bool = True,
) -> Checkpoint:
    """Read a container into a :class:`Checkpoint`.

    Args:
        lazy: keep the model weights as zero-copy views of the file (raw sections), read on
            access; otherwise load and verify everything now.
        with_tensors: False reads the header only (for listing and compatibility checks).

    Raises:
        FormatError, IntegrityError: the file is malformed or damaged.
    """
    # Not lazy: every tensor (weights, optimizer state, legacy graph) is copied into memory, so
    # nothing depends on the file afterwards.
    reader = LazyCheckpoint(path, verify=verify, copy=not lazy)
    try:
        ckpt = checkpoint_fields(reader.metadata, reader.preamble)
        if not with_tensors:
            return ckpt
        reader.to(device)
        # off the host, the whole section goes through one pipelined transfer
        eager = not lazy or off_host(torch.device(device))
        ckpt.tensors = reader.load_section("model", device) if eager else reader.state_dict("model")
        if "legacy" in reader.tree_names:
            from mettaformat.legacy.metta import graph_tensors

            ckpt.legacy_graph = reader.tree("legacy")
            # Named as the importer names them, not by their place in the stored tree.
            ckpt.legacy_tensors = graph_tensors(ckpt.legacy_graph)
        elif "legacy" in reader.sections:
            ckpt.legacy_tensors = reader.state_dict("legacy")
        trees = {name: reader.tree(name) for name in _TRAINING_TREES if name in reader.tree_names}
        if trees:
            ckpt.training = check_training(
                TrainingState(
                    optimizer=trees.get("optimizer"),
                    scheduler=trees.get("scheduler"),
                    trainer_state=_or_empty(trees.get("trainer_state")),
                    rng=_or_empty(trees.get("rng")),
                )
            )
        return ckpt
    finally:
        if not (lazy and with_tensors):
            reader.close()
