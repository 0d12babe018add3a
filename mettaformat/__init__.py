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
"""

from __future__ import annotations

from mettaformat.agent import MettaAgent
from mettaformat.anyformat import load_any
from mettaformat.checkpoint import Checkpoint, TrainingState
from mettaformat.compat import CompatibilityLevel, CompatibilityReport, RuntimeVersions, check_checkpoint_compatibility
from mettaformat.constants import MFMT_MAGIC, MFMT_VERSION_MAJOR, MFMT_VERSION_MINOR
from mettaformat.container.reader import LazyCheckpoint, load, load_file, open
from mettaformat.container.writer import save, save_file
from mettaformat.errors import MettaFormatError, ModelReconstructionError
from mettaformat.registry import register_model_type
from mettaformat.store import PolicyStore

__version__ = "0.1.0"

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
