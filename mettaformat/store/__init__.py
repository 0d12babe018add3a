"""PolicyStore: save, list, select, load and prune policy checkpoints.

- :class:`PolicyStore`: the store (``save``, ``policy``, ``policies``, ``select``, ``records``,
  ``prune``, ``clean_temp_files``).
- :class:`PolicyRecord`, :class:`Selection`, :class:`Exclusion`: what listing and selecting return.
- :class:`LatestN`, :class:`BestN`, :class:`EveryNEpochs`, :class:`AnyOf`: retention policies.
- :class:`PolicyCache`: the thread-safe LRU of loaded policies.
- :class:`PolicyMetadata`: Metta's metadata dict with required counters.
- :func:`register_scheme`: plug in a URI scheme (``s3://``...).

Module map: ``store`` (the class), ``catalog`` (reading records), ``index`` (the on-disk index),
``selectors``, ``retention``, ``maintenance`` (deletion), ``cache``, ``uri``, ``record``,
``metadata``.
"""

from __future__ import annotations

from mettaformat.store.cache import PolicyCache
from mettaformat.store.catalog import ScanResult
from mettaformat.store.maintenance import PruneReport, SkippedFile
from mettaformat.store.metadata import PolicyMetadata
from mettaformat.store.record import PolicyRecord
from mettaformat.store.retention import AnyOf, BestN, EveryNEpochs, LatestN, RetentionPolicy
from mettaformat.store.selectors import Exclusion, Mode, Selection, SelectorName
from mettaformat.store.store import PolicyStore, PolicyStoreWarning
from mettaformat.store.uri import INDEX_FILE_NAME, SchemeHandler, register_scheme, registered_schemes

__all__ = [
    "INDEX_FILE_NAME",
    "AnyOf",
    "BestN",
    "EveryNEpochs",
    "Exclusion",
    "LatestN",
    "Mode",
    "PolicyCache",
    "PolicyMetadata",
    "PolicyRecord",
    "PolicyStore",
    "PolicyStoreWarning",
    "PruneReport",
    "RetentionPolicy",
    "ScanResult",
    "SchemeHandler",
    "Selection",
    "SelectorName",
    "SkippedFile",
    "register_scheme",
    "registered_schemes",
]
