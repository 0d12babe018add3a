"""Helpers shared by the PolicyStore tests and the concurrent-saver worker.

Files are crafted directly (``write_checkpoint`` for containers, ``torch.save`` of Metta's v2
dict layout for legacy ``.pt`` files) so that each test controls the exact metadata on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mettaformat
from mettaformat.checkpoint import Checkpoint
from mettaformat.checkpoint_io import write_checkpoint

MODEL_TYPE = "store-tiny"

try:
    from mettaformat.legacy import import_legacy  # noqa: F401

    HAVE_LEGACY = True
    LEGACY_REASON = ""
except Exception as e:  # any import failure means "not written yet"
    HAVE_LEGACY = False
    LEGACY_REASON = f"mettaformat.legacy.import_legacy is not importable yet ({type(e).__name__}: {e})"

requires_legacy = pytest.mark.skipif(not HAVE_LEGACY, reason=LEGACY_REASON or "legacy importer present")


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # type: ignore[no-any-return]


def build_tiny(attrs: dict[str, Any], metadata: dict[str, Any], config: dict[str, Any]) -> nn.Module:
    return TinyNet()


mettaformat.register_model_type(MODEL_TYPE, build_tiny, replace=True)


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return TinyNet().state_dict()


def write_mfmt(
    directory: Path, name: str, metadata: dict[str, Any], *, seed: int = 0, mtime_ns: int | None = None
) -> Path:
    """A container with TinyNet weights and exactly ``metadata``."""
    path = directory / name
    write_checkpoint(Checkpoint(tensors=tiny_state(seed), model_type=MODEL_TYPE, metadata=dict(metadata)), path)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def write_legacy(
    directory: Path,
    name: str,
    metadata: dict[str, Any],
    *,
    model_type: str = "brain",
    seed: int = 0,
    mtime_ns: int | None = None,
) -> Path:
    """A Metta v2 (PR #973) ``.pt`` dict written by ``torch.save``."""
    path = directory / name
    torch.save(
        {
            "model_state_dict": tiny_state(seed),
            "metadata": dict(metadata),
            "checkpoint_format_version": 2,
            "model_type": model_type,
            "name": name,
            "uri": f"file://{path}",
        },
        path,
    )
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path
