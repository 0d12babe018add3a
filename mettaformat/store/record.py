"""``PolicyRecord``: what the store knows about one checkpoint file without loading its weights.

Framework-neutral (no torch): selectors and retention policies work on records alone.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from mettaformat.store.metadata import REQUIRED_FIELDS

__all__ = [
    "FileSignature",
    "PolicyRecord",
    "agent_step_of",
    "as_int",
    "effective_epoch",
    "epoch_from_name",
    "latest_key",
    "stat_signature",
]

#: ``model_0050.pt`` / ``model_0050.mfmt``: Metta's ``make_model_name(epoch)``.
_MODEL_NAME: Final = re.compile(r"^model_(\d+)\.[A-Za-z0-9_-]+$")


@dataclass(frozen=True, slots=True)
class FileSignature:
    """Identity of one version of a file: an atomic replace changes the inode and the mtime.

    Attributes:
        mtime_ns: modification time in nanoseconds.
        size: size in bytes.
        ino: inode number (a rewrite that keeps size and mtime still gets a new inode when it
            goes through a temp file and a rename).
    """

    mtime_ns: int
    size: int
    ino: int


def stat_signature(st: os.stat_result) -> FileSignature:
    return FileSignature(mtime_ns=st.st_mtime_ns, size=st.st_size, ino=st.st_ino)


@dataclass(frozen=True, kw_only=True)
class PolicyRecord:
    """One checkpoint file, described from its header (or the store's index).

    Attributes:
        path: the file.
        uri: ``file://`` URI of the file.
        name: the file name (``model_0050.mfmt``).
        metadata: the checkpoint's user metadata (read-only view).
        epoch: the epoch used for ordering: ``metadata["epoch"]``, or the number in a
            ``model_NNNN`` file name when the metadata lacks it or holds Metta's all-zero
            defaults (see :func:`effective_epoch`).
        agent_step: ``metadata["agent_step"]`` as an integer, 0 when absent.
        mtime_ns: modification time of the file when it was read.
        size: size of the file in bytes when it was read.
        format: what :func:`mettaformat.anyformat.sniff_format` called it (``"mettaformat"``,
            ``"torch-zip"``...).
        model_type: the registry name used to rebuild the model, if recorded.

    For a checkpoint in object storage, ``uri`` is its URI (``s3://bucket/run/model_0050.mfmt``),
    ``path`` its bucket/key and ``etag`` the version that was read.
    """

    path: Path
    uri: str
    name: str
    metadata: Mapping[str, Any] = field(hash=False)
    epoch: int
    agent_step: int
    mtime_ns: int
    size: int
    format: str
    model_type: str | None = None
    ino: int = field(default=0, repr=False)
    #: the object's ETag or generation, for checkpoints in object storage
    etag: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # A frozen record must not share a mutable dict with its creator.
        if not isinstance(self.metadata, MappingProxyType):
            object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    @property
    def signature(self) -> FileSignature:
        return FileSignature(mtime_ns=self.mtime_ns, size=self.size, ino=self.ino)

    @property
    def base(self) -> Path | None:
        """The checkpoint this one is stored as a delta of, read from its header now (None: a full
        checkpoint, another format, or a file in object storage)."""
        if self.format != "mettaformat" or self.etag is not None:
            return None
        from mettaformat.container.delta import declared_base

        return declared_base(self.path)


def as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None  # True is an int in Python, but never a count
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def epoch_from_name(name: str) -> int | None:
    """The ``NNNN`` of ``model_NNNN.<ext>``, or None."""
    m = _MODEL_NAME.match(name)
    return int(m.group(1)) if m else None


def _is_default_counters(metadata: Mapping[str, Any]) -> bool:
    """Metta era D filled missing counters with 0/0/0/0.0; such metadata says nothing about the epoch."""
    return all(k in metadata and as_int(metadata[k]) == 0 for k in REQUIRED_FIELDS)


def effective_epoch(metadata: Mapping[str, Any], file_name: str) -> int:
    """The epoch to order by.

    ``metadata["epoch"]`` when it is an integer, unless all four PolicyMetadata counters are
    zero (Metta's defaults, written when the trainer recorded nothing). Otherwise the number in
    a ``model_NNNN`` file name; otherwise 0.
    """
    epoch = as_int(metadata.get("epoch"))
    if epoch is not None and not _is_default_counters(metadata):
        return epoch
    from_name = epoch_from_name(file_name)
    if from_name is not None:
        return from_name
    return epoch if epoch is not None else 0


def agent_step_of(metadata: Mapping[str, Any]) -> int:
    step = as_int(metadata.get("agent_step"))
    return step if step is not None else 0


def latest_key(record: PolicyRecord) -> tuple[int, int, int, str, str]:
    """Sort key, ascending = older: epoch, then agent_step, then mtime, then name, then path.

    The path comes last only so that two files of the same name (a glob over several
    directories) still order deterministically.
    """
    return (record.epoch, record.agent_step, record.mtime_ns, record.name, str(record.path))
