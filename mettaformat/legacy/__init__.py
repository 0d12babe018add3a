"""Safe import of legacy torch-pickle checkpoints (Metta eras A-E, v2 dicts, trainer state).

The pickle is interpreted by our own VM; no class named in the file is imported and no
callable is called. See :func:`import_legacy`.
"""

from __future__ import annotations

from mettaformat.errors import LegacyFormatError, LegacyLimitError, LegacyUnsupportedError
from mettaformat.legacy.importer import import_legacy, import_legacy_bytes, sniff
from mettaformat.legacy.limits import DEFAULT_LIMITS, LegacyLimits
from mettaformat.legacy.numpy_compat import ndarray_to_tensor, numpy_scalar_value

__all__ = [
    "DEFAULT_LIMITS",
    "LegacyFormatError",
    "LegacyLimitError",
    "LegacyLimits",
    "LegacyUnsupportedError",
    "import_legacy",
    "import_legacy_bytes",
    "ndarray_to_tensor",
    "numpy_scalar_value",
    "sniff",
]
