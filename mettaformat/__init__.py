"""mettaformat: safe, fast, lazy checkpoints for reinforcement-learning policies.

The public surface is small:

- :func:`save_file` / :func:`save` write a state dict (raw or zstd) atomically.
- :func:`open` opens a file lazily; :func:`load_file` / :func:`load` load it whole.
- :func:`load_any` reads any format (container, legacy Metta ``.pt``, ``.safetensors``).
- :class:`PolicyStore` lists, selects (top/latest/random), caches and prunes checkpoints.
- :class:`MettaAgent` saves and loads policies and training checkpoints;
  :func:`register_model_type` tells it how to rebuild a model.
- :func:`check_checkpoint_compatibility` says whether a runtime can load a checkpoint.
- :class:`MettaFormatError` is the root of every error (see :mod:`mettaformat.errors`).

Importing the package is cheap: the names above that need torch are imported on first use
(PEP 562), so ``mettaformat --version`` and tools that only need the errors, the constants or
the header parser never pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mettaformat._lazy import lazy_attributes
from mettaformat.constants import MFMT_MAGIC, MFMT_VERSION_MAJOR, MFMT_VERSION_MINOR
from mettaformat.errors import MettaFormatError, ModelReconstructionError

if TYPE_CHECKING:
    from mettaformat.agent import MettaAgent
    from mettaformat.anyformat import load_any
    from mettaformat.checkpoint import Checkpoint, TrainingState
    from mettaformat.compat import (
        CompatibilityLevel,
        CompatibilityReport,
        RuntimeVersions,
        check_checkpoint_compatibility,
    )
    from mettaformat.container.reader import LazyCheckpoint, load, load_file, open
    from mettaformat.container.writer import save, save_file
    from mettaformat.registry import register_model_type
    from mettaformat.store import PolicyStore

__version__ = "0.1.0"

#: Public name -> the module that defines it, imported on first access.
_LAZY: dict[str, str] = {
    "MettaAgent": "mettaformat.agent",
    "load_any": "mettaformat.anyformat",
    "Checkpoint": "mettaformat.checkpoint",
    "TrainingState": "mettaformat.checkpoint",
    "CompatibilityLevel": "mettaformat.compat",
    "CompatibilityReport": "mettaformat.compat",
    "RuntimeVersions": "mettaformat.compat",
    "check_checkpoint_compatibility": "mettaformat.compat",
    "LazyCheckpoint": "mettaformat.container.reader",
    "load": "mettaformat.container.reader",
    "load_file": "mettaformat.container.reader",
    "open": "mettaformat.container.reader",
    "save": "mettaformat.container.writer",
    "save_file": "mettaformat.container.writer",
    "register_model_type": "mettaformat.registry",
    "PolicyStore": "mettaformat.store",
}


__getattr__ = lazy_attributes(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "MFMT_MAGIC",
    "MFMT_VERSION_MAJOR",
    "MFMT_VERSION_MINOR",
    "Checkpoint",
    "CompatibilityLevel",
    "CompatibilityReport",
    "LazyCheckpoint",
    "MettaAgent",
    "MettaFormatError",
    "ModelReconstructionError",
    "PolicyStore",
    "RuntimeVersions",
    "TrainingState",
    "__version__",
    "check_checkpoint_compatibility",
    "load",
    "load_any",
    "load_file",
    "open",
    "register_model_type",
    "save",
    "save_file",
]
