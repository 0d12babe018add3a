"""mettaformat: safe, fast, lazy checkpoints for reinforcement-learning policies.

The public surface is small:

- :func:`save_file` / :func:`save` write a state dict (raw or zstd) atomically.
- :func:`open` opens a file lazily; :func:`load_file` / :func:`load` load it whole.
- :class:`MettaFormatError` is the root of every error (see :mod:`mettaformat.errors`).
"""

from __future__ import annotations

from mettaformat.constants import MFMT_MAGIC, MFMT_VERSION_MAJOR, MFMT_VERSION_MINOR
from mettaformat.container.reader import LazyCheckpoint, load, load_file, open
from mettaformat.container.writer import save, save_file
from mettaformat.errors import MettaFormatError

__version__ = "0.1.0"

__all__ = [
    "MFMT_MAGIC",
    "MFMT_VERSION_MAJOR",
    "MFMT_VERSION_MINOR",
    "LazyCheckpoint",
    "MettaFormatError",
    "__version__",
    "load",
    "load_file",
    "open",
    "save",
    "save_file",
]
