"""What ``PolicyStore.save`` writes and where: the checkpoint, its file name, the local target.

The file name comes from the metadata's epoch unless given; an explicit path or name is checked
like any listed name. A delta save whose base turns out unusable is written again in full, so a
damaged base never costs a checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from torch import nn

from mettaformat.agent import MettaAgent
from mettaformat.checkpoint import Checkpoint
from mettaformat.checkpoint_io import write_checkpoint
from mettaformat.constants import Compression
from mettaformat.errors import StoreError, WriteError
from mettaformat.store.catalog import RecordCatalog
from mettaformat.store.record import PolicyRecord, as_int
from mettaformat.store.uri import check_file_name, local_path

__all__ = ["STORE_SUFFIX", "as_agent", "checkpoint_for", "default_name", "local_target", "read_back", "write_local"]

#: The suffix of the files the store writes.
STORE_SUFFIX: Final = ".mfmt"


def default_name(metadata: Mapping[str, Any]) -> str:
    epoch = as_int(metadata.get("epoch"))
    if epoch is None or epoch < 0:
        raise StoreError(
            "cannot name the checkpoint: the metadata has no non-negative integer 'epoch'; pass name= or path="
        )
    return f"model_{epoch:04d}{STORE_SUFFIX}"


def as_agent(agent: Any, model_type: str) -> MettaAgent:
    """``agent`` itself, or a bare ``nn.Module`` wrapped as one of ``model_type``."""
    if isinstance(agent, MettaAgent):
        return agent
    if isinstance(agent, nn.Module):
        return MettaAgent(agent, model_type=model_type)
    raise TypeError(f"PolicyStore.save needs agent=<MettaAgent or nn.Module>, got {type(agent).__name__}")


def checkpoint_for(agent: MettaAgent, metadata: dict[str, Any], name: str, uri: str) -> Checkpoint:
    """The checkpoint a save writes: ``agent`` with the merged ``metadata``, named after the file
    unless the agent has a name."""
    ckpt = agent.to_checkpoint()
    ckpt.metadata = metadata
    ckpt.name = agent.name or name
    ckpt.uri = uri
    return ckpt


def local_target(
    root: Path | str | None,
    name: str | None,
    path: str | os.PathLike[str] | None,
    metadata: Mapping[str, Any],
    *,
    overwrite: bool,
) -> Path:
    """The file a local save writes, its folder created; an existing file only with ``overwrite``."""
    if path is not None:
        target = local_path(path)
        check_file_name(target.name)
    else:
        if root is None:
            raise StoreError("PolicyStore.save needs path=... when the store has no root")
        if name is None:
            name = default_name(metadata)
        target = Path(root) / check_file_name(name)
    if target.suffix != STORE_SUFFIX:
        raise StoreError(f"PolicyStore writes mettaformat containers; {target.name!r} must end in {STORE_SUFFIX}")
    if not overwrite and os.path.lexists(target):
        raise StoreError(
            f"{target} already exists; pass overwrite=True to replace it, or another name=", region=str(target)
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def write_local(
    ckpt: Checkpoint, target: Path, *, compression: Compression, level: int | str, durable: bool, base: Path | None
) -> WriteError | None:
    """Write ``ckpt`` to ``target``, as a delta on ``base`` when given.

    Returns:
        None, or why ``base`` could not be used (the checkpoint was then written in full).
    """
    try:
        write_checkpoint(ckpt, target, compression=compression, level=level, durable=durable, base=base)
    except WriteError as e:
        if base is None or e.region != "base":
            raise
        write_checkpoint(ckpt, target, compression=compression, level=level, durable=durable)
        return e
    return None


def read_back(catalog: RecordCatalog, target: Path) -> PolicyRecord:
    """The record of the file just saved at ``target``, read from its header (and indexed).

    The record then equals what a later listing returns. Going through the catalog also copes with
    a concurrent saver replacing the file.
    """
    scan = catalog.scan([Path(os.path.abspath(target))])
    if not scan.records:
        detail = scan.unreadable[0].detail if scan.unreadable else "it vanished (deleted by another process?)"
        raise StoreError(f"saved {target}, but cannot read it back: {detail}", region=str(target))
    return scan.records[0]
